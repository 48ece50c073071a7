"""GRPO quality against TRL's GRPOTrainer on the same work, and against a placebo of ours.

    python -m bench.grpo_quality [--start runs/quickstart/sft/final/merged] [--iterations 30] ...

Both sides start from the same policy (the quickstart's SFT model by default), train LoRA (r 16, alpha 32, all
linear layers) on the same prompts in the same rollouts (`builtin:prompts_rl` from row 1024 on, no side sees the
scored rows; TRL reads its dataset unshuffled, given our stage's seeded rollout order), with the
built-in verifier as the reward, the same episodes (iterations x prompts x samples), learning rate (constant), KL
coefficient (k3 in the loss), temperature 1, response length and precision (bf16: autocast over fp32 weights on
both sides, our `train.precision: bf16-mixed`); one optimizer step of every rollout's
episodes on both sides, one CPU thread each. The placebo is our run with each group's rewards shuffled among its
answers: the same advantage sizes, no link between an answer and its score; a real gain must beat it.

Each trained policy and the start are scored by `align eval` on the first --eval-prompts rows of the same prompt
file (greedy, and --eval-samples answers at temperature 1: the score sampling optimises), and the gains are
paired prompt by prompt against the start, with standard errors. Prints a table and

    RESULT name=grpo-quality-vs-trl ours=<our paired sampled gain> peer=<TRL's> unit=gold ratio=<ours/peer>
    RESULT name=grpo-quality-vs-placebo ours=<our gain> peer=<the placebo's> unit=gold ratio=<ours/peer>

and whether ours beats the placebo by two standard errors of the paired difference.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import random
import subprocess
import sys
import time
import zlib
from pathlib import Path

from alignment.core.precision import resolve_precision
from bench.harness import ours_precision

REPO = Path(__file__).resolve().parent.parent
PROMPTS = "builtin:prompts_rl"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--start", default="runs/quickstart/sft/final/merged", help="the policy both sides start from")
    p.add_argument("--workdir", default="runs/bench/grpo_quality")
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--prompts-per-rollout", type=int, default=8)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--kl", type=float, default=0.02)
    p.add_argument("--skip-rows", type=int, default=1024, help="training prompts start at this row of the file")
    p.add_argument("--eval-prompts", type=int, default=512, help="the first N rows are scored (no side trains on them)")
    p.add_argument("--eval-samples", type=int, default=4)
    p.add_argument("--precision", default="auto", help="both sides: auto (bf16 where fast), bf16 or fp32")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per side")
    p.add_argument("--only", nargs="*", default=None, help="a subset of: ours placebo trl (scoring always runs)")
    p.add_argument("--ours-set", action="append", default=[], help="extra --set for our side (and the placebo)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def side_env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), WANDB_MODE="disabled",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def launch(cmd: list[str], log: Path, threads: int) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"+ {' '.join(cmd)}  (log: {log})", flush=True)
    return subprocess.Popen(cmd, cwd=REPO, env=side_env(threads), stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait(proc: subprocess.Popen, what: str) -> None:
    if proc.wait() != 0:
        sys.exit(f"{what} failed (exit {proc.returncode}); see its log")


# ---------------------------------------------------------------------------------------------- the two sides


def ours_command(args, out: Path, placebo: bool) -> list[str]:
    sets = {"output_dir": out, "seed": args.seed, "model.name_or_path": args.start, "data.train": PROMPTS,
            "data.skip_rows": args.skip_rows, "data.max_length": 96, "train.max_steps": args.iterations,
            "train.global_batch_size": args.prompts_per_rollout * args.samples, "train.micro_batch_size": 16,
            "train.learning_rate": args.lr, "train.lr_scheduler": "constant", "train.warmup_steps": 0,
            "train.precision": ours_precision(args.precision), "train.save_interval": 0, "lora.enabled": "true", "lora.r": 16,
            "lora.alpha": 32, "ppo.advantage": "grpo", "ppo.prompts_per_rollout": args.prompts_per_rollout,
            "ppo.samples_per_prompt": args.samples, "ppo.oversample": 1, "ppo.max_new_tokens": args.max_new_tokens,
            "ppo.kl_coef": args.kl, "ppo.kl_estimator": "k3", "ppo.kl_in": "loss", "ppo.temperature": 1.0,
            "ppo.loss_aggregation": "token_mean", "ppo.gold_eval.prompts": "null", "logging.progress_bar": "false"}
    if placebo:
        sets["ppo.rewards"] = "[{source: bench.grpo_quality:placebo_gold}]"
    cmd = [sys.executable, "-m", "alignment.cli", "ppo", "configs/smollm2/grpo.yaml", "--overwrite"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    for extra in args.ours_set:
        cmd += ["--set", extra]
    return cmd


def placebo_gold(prompts, responses, rows) -> list[float]:
    """The verifier's scores, shuffled among the answers of each group (K adjacent episodes share a prompt): the
    same advantage sizes as the real run, no link between an answer and its score."""
    from alignment.evaluate.rewards import gold

    scores = gold(prompts, responses, rows)
    out, start = [], 0
    while start < len(scores):
        end = start
        while end < len(scores) and prompts[end] == prompts[start]:
            end += 1
        group = scores[start:end]
        random.Random(zlib.crc32(json.dumps(prompts[start]).encode()) + start).shuffle(group)
        out += group
        start = end
    return out


def prompts_in_our_order(rows: list, per_rollout: int, iterations: int, seed: int) -> list[dict]:
    """The prompts our stage rolls out, iteration after iteration (alignment.rlhf.episodes.rollout_prompts over
    the same rows, seeded), for TRL's unshuffled dataset: its rollout i holds our rollout i's prompts, in order."""
    from alignment.rlhf.episodes import rollout_prompts

    return [rows[i].data for it in range(1, iterations + 1) for i in rollout_prompts(len(rows), per_rollout, it, seed)]


def trl_worker(spec_path: str) -> None:
    """TRL's GRPOTrainer on the same work: LoRA on the start model loaded in fp32, bf16 autocast when asked,
    loss_type dapo (token-level, as ours), one optimizer step per rollout of prompts x samples episodes."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from alignment.data.sources import read_rows
    from alignment.evaluate.rewards import gold

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    rows = prompts_in_our_order(read_rows(PROMPTS)[spec["skip_rows"]:], spec["prompts"], spec["iterations"],
                                spec["seed"])
    data = Dataset.from_list([{"prompt": r["prompt"], "gold_spec": json.dumps(r["gold"])} for r in rows])

    def gold_reward(prompts, completions, gold_spec, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return gold(prompts, texts, [{"gold": json.loads(g)} for g in gold_spec])

    episodes = spec["prompts"] * spec["samples"]
    micro = min(8, episodes)
    accumulation = episodes // micro
    precision = resolve_precision(spec["precision"])[0]
    config = GRPOConfig(
        output_dir=spec["output_dir"], per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation,
        steps_per_generation=accumulation, num_generations=spec["samples"],
        max_completion_length=spec["max_new_tokens"], temperature=1.0, top_p=1.0, top_k=0, num_iterations=1,
        beta=spec["kl"], loss_type="dapo", learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
        bf16=precision == "bf16", use_cpu=not torch.cuda.is_available(), max_steps=spec["iterations"],
        gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to="none", seed=spec["seed"],
        shuffle_dataset=False, model_init_kwargs={"dtype": torch.float32})
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=spec["start"], reward_funcs=gold_reward, args=config, train_dataset=data,
                          peft_config=lora)
    trainer.train()
    merged = trainer.model.merge_and_unload()
    merged.save_pretrained(spec["export"])
    trainer.processing_class.save_pretrained(spec["export"])


# ---------------------------------------------------------------------------------------------- scoring


def eval_command(args, policy: Path | str, out: Path) -> list[str]:
    return [sys.executable, "-m", "alignment.cli", "eval", "--policy", str(policy), "--prompts", PROMPTS,
            "--num-prompts", str(args.eval_prompts), "--samples", str(args.eval_samples), "--temperature", "1.0",
            "--max-new-tokens", str(args.max_new_tokens), "--seed", str(args.seed), "--out", str(out)]


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
    return mean, math.sqrt(var / len(d))


def main(argv=None) -> int:
    args = parse_args(argv)
    work = (REPO / args.workdir).resolve()
    start = Path(args.start)
    if not (start / "config.json").is_file():
        sys.exit(f"--start {start}: no model there; run `make quickstart` first (its SFT model is the default "
                 "start), or give another policy directory")
    args.start = str(start.resolve())
    sides = args.only or ["ours", "placebo", "trl"]
    started = time.time()
    procs = {}
    # If a side fails, the bench exits: TRL's worker must not go on training without it.
    atexit.register(lambda: [proc.terminate() for proc in procs.values() if proc.poll() is None])
    if "trl" in sides:
        spec = {"start": args.start, "skip_rows": args.skip_rows, "prompts": args.prompts_per_rollout,
                "samples": args.samples, "iterations": args.iterations, "max_new_tokens": args.max_new_tokens,
                "kl": args.kl, "lr": args.lr, "precision": args.precision, "seed": args.seed, "threads": args.threads,
                "output_dir": str(work / "trl" / "trainer"), "export": str(work / "trl" / "final")}
        (work / "trl").mkdir(parents=True, exist_ok=True)
        (work / "trl" / "spec.json").write_text(json.dumps(spec))
        procs["trl"] = launch([sys.executable, "-m", "bench.grpo_quality", "--trl-worker",
                               str(work / "trl" / "spec.json")], work / "trl.log", args.threads)
    # Ours, the placebo and the scoring of the start share the other thread(s), one after the other.
    policies = {"start": args.start}
    for side in ("ours", "placebo"):
        if side in sides:
            out = work / side
            wait(launch(ours_command(args, out, side == "placebo"), work / f"{side}.log", args.threads), side)
            policies[side] = str(out / "final" / "merged")
    # TRL's export is scored on TRL's thread as soon as its training ends, beside the scorings on ours (one after
    # the other they left a core idle for about half an hour).
    def score(name: str) -> subprocess.Popen:
        out = work / f"eval-{name}"
        return launch(eval_command(args, policies[name], out), work / f"eval-{name}.log", args.threads)

    trl_scoring = None

    def score_trl_once_trained() -> None:
        nonlocal trl_scoring
        if "trl" in procs and trl_scoring is None and procs["trl"].poll() is not None:
            wait(procs["trl"], "TRL")
            policies["trl"] = str(work / "trl" / "final")
            trl_scoring = procs["trl scoring"] = score("trl")

    for name in list(policies):
        proc = score(name)
        while proc.poll() is None:  # ends with the scoring process
            score_trl_once_trained()
            time.sleep(5)
        wait(proc, f"scoring {name}")
    if "trl" in procs:
        procs["trl"].wait()
        score_trl_once_trained()
        wait(trl_scoring, "scoring trl")
    scores = {name: json.loads((work / f"eval-{name}" / "eval.json").read_text())["per_prompt"] for name in policies}
    base = scores["start"]
    print(f"\nGRPO quality, {args.iterations} rollouts x {args.prompts_per_rollout} prompts x {args.samples} answers "
          f"from {args.start}; scored on the first {args.eval_prompts} rows of {PROMPTS}, paired against the start "
          f"({time.time() - started:.0f} s in all)")
    print(f"{'policy':10s} {'greedy':>8s} {'gain':>18s} {'sampled':>8s} {'gain':>18s}")
    gains = {}
    for name, s in scores.items():
        assert s["id"] == base["id"], "the evaluations scored different prompts"
        g = sum(s["gold"]) / len(s["gold"])
        sm = sum(s["gold_sampled"]) / len(s["gold_sampled"])
        if name == "start":
            print(f"{name:10s} {g:8.3f} {'-':>18s} {sm:8.3f} {'-':>18s}")
            continue
        gg, gse = paired(s["gold"], base["gold"])
        gains[name] = paired(s["gold_sampled"], base["gold_sampled"])
        print(f"{name:10s} {g:8.3f} {gg:+8.3f} +- {gse:.3f} {sm:8.3f} {gains[name][0]:+8.3f} +- {gains[name][1]:.3f}")
    if "ours" in gains and "trl" in gains:
        for kind in ("gold_sampled", "gold"):  # the same prompts, so the difference is paired too
            diff, se = paired(scores["ours"][kind], scores["trl"][kind])
            print(f"ours - trl ({'sampled' if kind == 'gold_sampled' else 'greedy'}, paired): {diff:+.4f} +- {se:.4f}")
        ours, peer = gains["ours"][0], gains["trl"][0]
        print(f"RESULT name=grpo-quality-vs-trl ours={ours:.4f} peer={peer:.4f} unit=gold "
              f"ratio={ours / peer if peer else float('nan'):.3f}")
    if "ours" in gains and "placebo" in gains:
        diff, se = paired(scores["ours"]["gold_sampled"], scores["placebo"]["gold_sampled"])
        ours, peer = gains["ours"][0], gains["placebo"][0]
        print(f"ours - placebo (sampled, paired): {diff:+.4f} +- {se:.4f} ({diff / se if se else float('nan'):.1f} "
              "standard errors)")
        print(f"RESULT name=grpo-quality-vs-placebo ours={ours:.4f} peer={peer:.4f} unit=gold "
              f"ratio={ours / peer if peer else float('nan'):.3f}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--trl-worker":
        trl_worker(sys.argv[2])
    else:
        sys.exit(main())
