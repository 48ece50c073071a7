"""Online-RL throughput: `align ppo` against TRL, side by side, and our ZeRO-3 rollout against an unsharded one.

    .venv/bin/python -m bench.ppo [--parts grpo,ppo,rollout] [--iterations 4] [--warmup 1] [--threads 0] [--precision bf16|fp32]

Both sides of a comparison get the same model (the built-in SmolLM2-135M-Instruct, full fine-tune, bf16
mixed precision: trained models in fp32 with bf16 autocast, frozen ones in bf16; or fp32 throughout
with --precision fp32, the default where this machine has no fast bf16 matmuls, as recipes' auto),
the same prompts (the built-in task's train prompts, tokenized by our chat-template path), the same
reward, group size or rollout batch, response length (max_new_tokens, sampling at temperature 1,
stopping at EOS), PPO epochs and minibatches, learning rate and KL coefficient. Throughput is episodes
(prompt + sampled response, scored and trained on) per second of wall time over the timed iterations:
one iteration is one rollout with its updates on both sides; the first `--warmup` are not timed.

- grpo-vs-trl: ours `align ppo configs/smollm2/grpo.yaml` (ppo.advantage grpo, the verifier as reward)
  against the installed TRL's GRPOTrainer on its transformers-generate path (use_vllm false), with the
  same verifier as its reward function, num_generations = our samples_per_prompt, generation batch =
  our rollout, its optimizer steps = our minibatches (steps_per_generation), num_iterations = epochs.
- ppo-vs-trl: ours `align ppo configs/smollm2/ppo.yaml` (GAE, a critic) against TRL 0.29.1's
  experimental PPOTrainer (the last TRL with PPO), installed by this script into a virtual environment
  of its own (bench/.venv-trl029) with torch pinned by a constraints file to the CPU build this project
  uses, so nothing pulls CUDA wheels. Both score with the same reward model (SmolLM2 with a fixed random
  scalar head, made here: throughput does not depend on what the head learned), whose critic both
  initialise from it; one response per prompt, TRL's batch = our prompts_per_rollout. TRL 0.29.1 steps
  its optimizer once per rollout batch and epoch whatever num_mini_batches says (its gradient
  accumulation spans the minibatches), so this part uses --ppo-minibatches (default 1) on both sides.
- rollout-zero3-vs-unsharded: our rollout (KVCacheSampler through Engine.generation_view) on 2 ranks
  under ZeRO-3 against one unsharded process on the same prompts, generated tokens per second; each
  side gets the same cores (2 ranks x 1 thread against 1 process x 2 threads by default).

Ends with a RESULT line per part:
    RESULT name=grpo-vs-trl ours=<episodes/s> peer=<episodes/s> unit=episodes/s ratio=<ours/peer>
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.data import PROMPTS, SEED, prompt_ids, prompt_rows
from bench.harness import (PYTHON, REPO, add_precision_option, add_worker_option, add_workdir_option,
                           argument_parser, bench_workdir, memory_line, read_jsonl, resolve_precision, result_line,
                           run_stage, run_worker, serve_worker, side_env, smollm2_path, step_clock, write_result)

MODULE = "bench.ppo"
TRL029_VENV = REPO / "bench" / ".venv-trl029"
TRL029 = "0.29.1"


def parse_args(argv=None):
    p = argument_parser(MODULE, __doc__)
    p.add_argument("--parts", default="grpo,ppo,rollout", help="comma-separated: grpo, ppo, rollout")
    p.add_argument("--iterations", type=int, default=4, help="rollouts per side, warm-up included")
    p.add_argument("--warmup", type=int, default=1, help="first iterations not timed")
    p.add_argument("--prompts", type=int, default=16, help="prompts per rollout")
    p.add_argument("--samples", type=int, default=4, help="GRPO group size (PPO: 1 response per prompt)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--minibatches", type=int, default=2, help="GRPO: optimizer steps per epoch of a rollout")
    p.add_argument("--ppo-minibatches", type=int, default=1,
                   help="PPO: optimizer steps per epoch of a rollout; TRL 0.29.1 steps once per rollout batch and "
                        "epoch whatever its num_mini_batches (its accumulation runs across minibatches), so 1 "
                        "is the setting where both sides take the same optimizer steps")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--zero-stage", type=int, default=0, help="our side's deepspeed.zero_stage (one process)")
    p.add_argument("--kl-coef", type=float, default=0.02)
    add_precision_option(p)
    p.add_argument("--threads", type=int, default=0, help="torch threads per side; 0 = all cores")
    add_workdir_option(p)
    add_worker_option(p)
    return p.parse_args(argv)


def iterations_from_metrics(path: Path, warmup: int) -> tuple[float, float, int]:
    """(episodes, seconds, iterations) over our timed iterations, from metrics.jsonl."""
    rows = [r for r in read_jsonl(path) if "time/rollout" in r]
    timed = rows[warmup:]
    seconds = sum(sum(v for k, v in r.items() if k.startswith("time/")) for r in timed)
    episodes = sum(r["train/episodes_per_s"] * sum(v for k, v in r.items() if k.startswith("time/")) for r in timed)
    return episodes, seconds, len(timed)


# ---------------------------------------------------------------------------
# GRPO: ours against TRL's GRPOTrainer
# ---------------------------------------------------------------------------


def ours_rl(args, workdir: Path, tag: str, recipe: str, sets: dict) -> tuple[float, float]:
    out = workdir / tag
    base = {"output_dir": out, "seed": SEED, "model.name_or_path": "smollm2-135m", "data.train": PROMPTS,
            "lora.enabled": "false", "train.precision": args.precision, "train.max_steps": args.iterations,
            # one process: ZeRO-2 shards nothing and its bf16 step costs ~1.5 s more per engine on this CPU
            "deepspeed.zero_stage": args.zero_stage,
            "train.learning_rate": args.lr, "train.lr_scheduler": "constant", "train.warmup_steps": 0,
            "train.micro_batch_size": args.micro_batch, "train.save_interval": 0, "ppo.max_new_tokens": args.max_new_tokens,
            "ppo.epochs": args.epochs, "ppo.kl_coef": args.kl_coef, "ppo.gold_eval.prompts": "null",
            "logging.progress_bar": "false", "logging.wandb": "disabled"}
    run_stage("ppo", recipe, {**base, **sets}, workdir, tag, env=side_env(args.threads))
    episodes, seconds, n = iterations_from_metrics(out / "metrics.jsonl", args.warmup)
    print(f"[{tag}] {episodes:.0f} episodes in {seconds:.1f}s over {n} timed iterations", flush=True)
    return episodes, seconds


def trl_grpo_worker(spec: dict) -> None:
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from alignment.evaluate import rewards

    rows = prompt_rows(spec["prompts"] * spec["iterations"])
    dataset = Dataset.from_list([{"prompt": r["prompt"], "gold_spec": json.dumps(r["gold"])} for r in rows])

    def gold_reward(prompts, completions, gold_spec, **kwargs):
        """Our verifier, the reward our side uses (TRL passes dataset columns as keyword arguments)."""
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return rewards.gold(prompts, texts, [{"gold": json.loads(g)} for g in gold_spec])

    episodes = spec["prompts"] * spec["samples"]
    per_step = episodes // spec["minibatches"]
    accumulation = per_step // spec["micro_batch"]
    config = GRPOConfig(
        output_dir=spec["output_dir"], per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=accumulation, steps_per_generation=accumulation * spec["minibatches"],
        num_generations=spec["samples"], max_completion_length=spec["max_new_tokens"], temperature=1.0,
        top_p=1.0, num_iterations=spec["epochs"], beta=spec["kl_coef"], learning_rate=spec["lr"],
        lr_scheduler_type="constant", warmup_steps=0, bf16=spec["precision"] == "bf16", use_cpu=not torch.cuda.is_available(),
        max_steps=spec["iterations"] * spec["minibatches"] * spec["epochs"], use_vllm=False,
        gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to="none", seed=SEED,
        shuffle_dataset=False, loss_type="grpo",
    )
    clock = step_clock()
    trainer = GRPOTrainer(model=smollm2_path(), reward_funcs=gold_reward, args=config, train_dataset=dataset,
                          callbacks=[clock])
    trainer.train()
    write_result(spec, {"seconds": clock.seconds, "episodes_per_step": per_step})


def run_trl_grpo(args, workdir: Path) -> tuple[float, float]:
    spec = {"output_dir": str(workdir / "trl-grpo"), "prompts": args.prompts, "samples": args.samples,
            "max_new_tokens": args.max_new_tokens, "epochs": args.epochs, "minibatches": args.minibatches, "micro_batch": args.micro_batch,
            "lr": args.lr, "kl_coef": args.kl_coef, "iterations": args.iterations, "precision": args.precision}
    result = run_worker(MODULE, "trl-grpo", spec, workdir, "trl-grpo", env=side_env(args.threads))
    steps_per_iteration = args.minibatches * args.epochs
    timed = result["seconds"][args.warmup * steps_per_iteration:]
    episodes = len(timed) // args.epochs * result["episodes_per_step"]
    print(f"[trl-grpo] {episodes} episodes in {sum(timed):.1f}s over {len(timed)} timed optimizer steps", flush=True)
    return episodes, sum(timed)


def part_grpo(args, workdir: Path) -> str:
    per_step = args.prompts * args.samples // args.minibatches
    ours = ours_rl(args, workdir, "ours-grpo", "configs/smollm2/grpo.yaml", {
        "ppo.advantage": "grpo", "ppo.rewards": "[{source: gold}]", "ppo.prompts_per_rollout": args.prompts,
        "ppo.samples_per_prompt": args.samples, "train.global_batch_size": per_step, "ppo.oversample": 1,
        "ppo.loss_aggregation": "seq_mean_token_mean"})
    peer = run_trl_grpo(args, workdir)
    line = result_line("grpo-vs-trl", ours[0] / ours[1], peer[0] / peer[1], "episodes/s")
    return line + "\n" + memory_line("grpo-vs-trl", "ours-grpo", "trl-grpo")


# ---------------------------------------------------------------------------
# PPO: ours against TRL 0.29.1's PPOTrainer (its own virtual environment)
# ---------------------------------------------------------------------------


def make_reward_model(workdir: Path) -> Path:
    """SmolLM2 with a fixed random scalar head, saved as a reward model directory (both sides score with it)."""
    import torch

    from alignment.core.models import load_model, load_tokenizer
    from reward.model import ensure_distinct_pad

    out = workdir / "reward-model"
    if (out / "config.json").exists():
        return out
    tokenizer = load_tokenizer(smollm2_path())
    torch.manual_seed(SEED)
    model = load_model(smollm2_path(), "reward")
    ensure_distinct_pad(tokenizer, model)
    model.config.reward_mean, model.config.reward_std = 0.0, 1.0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def trl029_python() -> str:
    """The TRL 0.29.1 environment's python, created on first use (torch constrained to this project's build)."""
    python = TRL029_VENV / "bin" / "python"
    stamp = TRL029_VENV / ".installed"
    if stamp.exists():
        return str(python)
    import importlib.metadata as md

    versions = {name: md.version(name) for name in ("torch", "transformers", "accelerate", "datasets", "safetensors")}
    subprocess.run([PYTHON, "-m", "venv", str(TRL029_VENV)], check=True)
    constraints = TRL029_VENV / "constraints.txt"
    constraints.write_text(f"torch=={versions['torch'].split('+')[0]}\n")
    pip = [str(python), "-m", "pip", "install", "-q", "-c", str(constraints)]
    subprocess.run(pip + [f"torch=={versions['torch'].split('+')[0]}"], check=True)
    subprocess.run(pip + [f"trl=={TRL029}", f"transformers=={versions['transformers']}",
                          f"accelerate=={versions['accelerate']}", f"datasets=={versions['datasets']}",
                          f"safetensors=={versions['safetensors']}"], check=True)
    out = subprocess.run([str(python), "-c", "import torch, trl; print(torch.__version__, trl.__version__)"],
                         capture_output=True, text=True, check=True).stdout.split()
    if out[1] != TRL029 or "+cpu" not in out[0] and not out[0].startswith(versions["torch"].split("+")[0]):
        raise RuntimeError(f"{TRL029_VENV}: torch {out[0]}, trl {out[1]}")
    stamp.write_text(" ".join(out) + "\n")
    return str(python)


def trl_ppo_worker(spec: dict) -> None:
    """Runs in the TRL 0.29.1 environment: no import of this project's packages (only the prompt ids it wrote;
    bench.harness and bench.data import nothing of it at module level)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["policy"], padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = Dataset.from_list([{"input_ids": ids} for ids in json.loads(Path(spec["prompts_file"]).read_text())])
    # The same precision as our side: the trained models (policy, value) hold fp32 weights and Adam states and
    # compute under bf16 autocast (the Trainer's bf16=True: AMP, as TRL's GRPOTrainer loads by default); the
    # frozen ones (reference, reward) are bf16, as ours are. Loading the trained models in bf16 instead is
    # pure-bf16 training, another setting: it halves their weights and optimizer state and, at lr 1e-6, rounds
    # most updates away (see README, "Quality against TRL").
    bf16 = spec["precision"] == "bf16"
    trained, frozen = torch.float32, torch.bfloat16 if bf16 else torch.float32
    policy = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=trained)
    ref = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=frozen)
    reward = AutoModelForSequenceClassification.from_pretrained(spec["reward"], num_labels=1, dtype=frozen)
    value = AutoModelForSequenceClassification.from_pretrained(spec["reward"], num_labels=1, dtype=trained)
    batch = spec["prompts"]
    # TRL 0.29.1: local_batch_size = per_device_train_batch_size * gradient_accumulation_steps (the rollout),
    # split into num_mini_batches; the optimizer steps every gradient_accumulation_steps micro-batches.
    accumulation = batch // spec["micro_batch"]
    config = PPOConfig(
        output_dir=spec["output_dir"], per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=accumulation, num_mini_batches=spec["minibatches"],
        num_ppo_epochs=spec["epochs"], total_episodes=batch * spec["iterations"], response_length=spec["max_new_tokens"],
        temperature=1.0, stop_token="eos", kl_coef=spec["kl_coef"], learning_rate=spec["lr"],
        lr_scheduler_type="constant", bf16=bf16, use_cpu=not torch.cuda.is_available(), num_sample_generations=0,
        local_rollout_forward_batch_size=spec["micro_batch"], save_strategy="no", report_to="none", seed=SEED,
        vf_coef=0.1, cliprange=0.2, cliprange_value=0.2, gamma=1.0, lam=0.95,
    )

    clock = step_clock()
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=dataset, value_model=value, callbacks=[clock])
    clock.start()
    trainer.train()
    write_result(spec, {"seconds": clock.seconds, "episodes_per_step": trainer.args.batch_size})


def part_ppo(args, workdir: Path) -> str:
    from alignment.core.models import load_tokenizer

    reward = make_reward_model(workdir)
    per_step = args.prompts // args.ppo_minibatches
    ours = ours_rl(args, workdir, "ours-ppo", "configs/smollm2/ppo.yaml", {
        "ppo.advantage": "gae", "ppo.rewards": f"[{{source: {reward}}}]", "ppo.prompts_per_rollout": args.prompts,
        "ppo.samples_per_prompt": 1, "train.global_batch_size": per_step, "ppo.vf_coef": 0.1,
        "ppo.critic_learning_rate": args.lr, "ppo.whiten_advantages": "true"})
    prompts_file = workdir / "ppo-prompts.json"
    prompts_file.write_text(json.dumps(prompt_ids(prompt_rows(args.prompts * args.iterations),
                                                  load_tokenizer(smollm2_path()))))
    spec = {"policy": smollm2_path(), "reward": str(reward), "prompts_file": str(prompts_file),
            "output_dir": str(workdir / "trl-ppo"), "prompts": args.prompts,
            "micro_batch": args.micro_batch, "minibatches": args.ppo_minibatches, "epochs": args.epochs,
            "max_new_tokens": args.max_new_tokens, "kl_coef": args.kl_coef, "lr": args.lr,
            "iterations": args.iterations, "precision": args.precision}
    env = side_env(args.threads)
    env.pop("PYTHONPATH")  # nothing of this project's environment; `-m bench.ppo` runs from the repository root
    result = run_worker(MODULE, "trl-ppo", spec, workdir, "trl-ppo", env=env, python=trl029_python())
    timed = result["seconds"][args.warmup:]
    episodes = len(timed) * result["episodes_per_step"]
    print(f"[trl-ppo] {episodes} episodes in {sum(timed):.1f}s over {len(timed)} timed rollouts", flush=True)
    line = result_line("ppo-vs-trl", ours[0] / ours[1], episodes / sum(timed), "episodes/s")
    return line + "\n" + memory_line("ppo-vs-trl", "ours-ppo", "trl-ppo")


# ---------------------------------------------------------------------------
# Rollout: 2 ranks under ZeRO-3 against one unsharded process
# ---------------------------------------------------------------------------


def rollout_worker(spec: dict) -> None:
    import torch

    from alignment.data import text
    from alignment.core.config import DeepSpeedConfig, TrainConfig
    from alignment.core.models import load_model, load_tokenizer
    from alignment.rlhf.rollout import KVCacheSampler

    sharded = spec["zero_stage"] == 3
    tokenizer = load_tokenizer(smollm2_path())
    rows = prompt_rows(spec["prompts"])
    if sharded:
        from alignment.core.engine import Engine

        engine = Engine(TrainConfig(global_batch_size=2, micro_batch_size=1, precision=spec["precision"]),
                        DeepSpeedConfig(zero_stage=3), seed=SEED)
        rank, world = engine.dist.rank, engine.dist.world_size
        with engine.model_init():
            model = load_model(smollm2_path())
        prepared = engine.prepare(model, total_steps=1)
    else:
        rank, world = 0, 1
        dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
        model = load_model(smollm2_path()).to(dtype).eval()
    mine = rows[rank::world]
    ids = [p for p in prompt_ids(mine, tokenizer) for _ in range(spec["samples"])]
    seeds = list(range(rank * 100000, rank * 100000 + len(ids)))

    def sample(policy):
        return KVCacheSampler(policy, max_new_tokens=spec["max_new_tokens"], stop_ids=text.stop_token_ids(tokenizer),
                              pad_id=tokenizer.pad_token_id, batch_size=64)(ids, seeds)

    timings = []
    for round_ in range(spec["rounds"]):
        if sharded:
            engine.dist.barrier()
        started = time.perf_counter()
        if sharded:
            with engine.generation_view(prepared) as policy:
                out = sample(policy)
        else:
            out = sample(model)
        seconds = time.perf_counter() - started
        tokens = sum(len(r) for r in out.response_ids)
        if sharded:
            seconds = engine.dist.reduce_max(seconds)  # the rollout ends when its slowest rank does
            tokens = engine.dist.global_sum(tokens)
        timings.append({"seconds": seconds, "tokens": tokens})
    if rank == 0:
        write_result(spec, timings)
    if sharded:
        engine.close()


def part_rollout(args, workdir: Path) -> str:
    from alignment.core.distributed import free_port

    threads = args.threads or os.cpu_count() or 2
    results = {}
    for tag, zero, nproc in (("rollout-unsharded", 0, 1), ("rollout-zero3", 3, 2)):
        spec = {"zero_stage": zero, "prompts": 32, "samples": args.samples, "max_new_tokens": args.max_new_tokens,
                "rounds": args.iterations, "precision": args.precision}
        launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                    f"--master_port={free_port()}"] if nproc > 1 else None
        per_process = max(1, threads // nproc)  # the same cores on both sides
        timings = run_worker(MODULE, "rollout", spec, workdir, tag, env=side_env(per_process),
                             launcher=launcher)[args.warmup:]
        results[tag] = sum(t["tokens"] for t in timings) / sum(t["seconds"] for t in timings)
        print(f"[{tag}] {results[tag]:.1f} generated tokens/s ({nproc} process x {per_process} threads)", flush=True)
    return result_line("rollout-zero3-vs-unsharded", results["rollout-zero3"], results["rollout-unsharded"],
                              "tokens/s")


# ---------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return serve_worker(args.worker, {"trl-grpo": trl_grpo_worker, "trl-ppo": trl_ppo_worker,
                                          "rollout": rollout_worker})
    resolve_precision(args)  # not in workers: TRL 0.29.1's environment has no alignment
    started = time.perf_counter()
    parts = {"grpo": part_grpo, "ppo": part_ppo, "rollout": part_rollout}
    lines = []
    with bench_workdir(args.workdir, "bench-ppo-") as workdir:
        print(f"ppo benchmarks: smollm2-135m full fine-tune {args.precision}, {args.prompts} prompts per rollout, group "
              f"{args.samples} (GRPO), {args.max_new_tokens} new tokens, {args.epochs} epoch(s) x "
              f"{args.minibatches} minibatches (GRPO) / {args.ppo_minibatches} (PPO), micro-batch {args.micro_batch}, {args.iterations} iterations "
              f"({args.warmup} warm-up), threads per side {args.threads or 'all'}", flush=True)
        for name in args.parts.split(","):
            lines.append(parts[name.strip()](args, workdir))
        print(f"benchmark wall time {time.perf_counter() - started:.0f}s")
        for line in lines:
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
