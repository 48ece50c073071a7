"""SFT throughput: this project's `align sft` against TRL's SFTTrainer, side by side.

    .venv/bin/python bench/sft.py [--timed-steps 12] [--max-length 128] [--lora] [--precision bf16]

Both sides get the same model (built-in SmolLM2-135M-Instruct), the same rows of
the built-in task's SFT data as the same token ids and labels (our tokenization:
chat template, loss on the assistant turn only), in the same order, the same
max_length, global/micro batch, precision, full fine-tune (or the same LoRA),
AdamW at the same LR and schedule, gradient clipping 1.0, no gradient
checkpointing, no eval/saving/trackers, dataloader workers 0 and the same number
of optimizer steps. Everything else in TRL is left at its defaults (fused AdamW,
AMP autocast for bf16, its fused LM head with entropy / token-accuracy metrics).

Each side runs in its own subprocess; ours is the real stage (`python -m
alignment.cli sft ...`, timings from its metrics.jsonl), TRL's is this file in
`--trl-worker` mode with a callback timing each optimizer step. Throughput =
non-padding input tokens over the timed steps / their wall time; the first
`--warmup-steps` steps of each side are not timed. Ends with:

    RESULT name=sft-vs-trl ours=<tokens/s> peer=<tokens/s> unit=tokens/s ratio=<ours/peer>

Why one CPU thread per side by default: on a small machine shared with other
jobs (2 cores here), a process with one OpenMP thread per core stalls whenever
another job takes a core, since every parallel op waits for its slowest thread;
steps then ran 3-10x slower and erratically (20-60 s instead of ~6 s here,
with a ratio that said more about the neighbours than about the trainers). One thread per side keeps both sides'
steps steady. `--threads 0` uses torch's default (all cores) on both sides, the
better choice on an idle machine; `--rounds N` alternates the sides N times and
keeps each side's best round.

Why pre-tokenized rows for TRL: TRL's own conversational prompt-completion path
puts the "\\n" after the assistant's <|im_end|> into the completion, so each row
would have one more input token and one more supervised token than ours (which
ends the assistant span at <|im_end|>). Handing TRL our input_ids + labels (its
documented path for processed datasets) makes the two sides' batches identical.
Tokenization is setup on both sides and outside the timed steps either way.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.setup_path()

RESULT_NAME = "sft-vs-trl"
RECIPE = common.REPO / "configs" / "smollm2" / "sft.yaml"
SEED = 0
LR = 1.0e-4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--timed-steps", type=int, default=12, help="optimizer steps timed on each side")
    p.add_argument("--warmup-steps", type=int, default=2, help="optimizer steps run first and not timed")
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                   help="both sides; default bf16 where this machine runs it fast, else fp32")
    p.add_argument("--lora", action="store_true", help="LoRA r=16 alpha=32 on all linear layers on both sides "
                   "(default: full fine-tune)")
    p.add_argument("--zero-stage", type=int, default=None, help="our DeepSpeed ZeRO stage (default: the recipe's)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per side (OMP_NUM_THREADS), the same on "
                   "both; 0 = torch's default (all cores). Default 1: see the module docstring")
    p.add_argument("--rounds", type=int, default=1, help="run the sides alternately this many times each and keep "
                   "each side's best round (for a machine shared with other jobs)")
    p.add_argument("--only", choices=["ours", "trl"], default=None, help="run one side only (no RESULT line)")
    p.add_argument("--workdir", default=None, help="keep outputs here (default: a temporary directory, removed)")
    p.add_argument("--trl-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.precision = args.precision or common.default_precision()
    return args


# ---------------------------------------------------------------------------
# Shared data: the same rows, tokenized once by our code, in our sampler's order
# ---------------------------------------------------------------------------


def build_data(args, workdir: Path) -> dict:
    from alignment.core.config import DataConfig
    from alignment.data.report import DataReport
    from alignment.data.sampler import GlobalBatchSampler
    from alignment.data.sft import build_sft_examples
    from alignment.data.sources import read_rows
    from alignment.core.models import load_tokenizer

    class Layout:  # what GlobalBatchSampler reads of a BatchLayout
        global_batch_size = args.global_batch
        micro_batch_size = args.micro_batch
        world_size = 1
        grad_accum_steps = args.global_batch // args.micro_batch

    steps = args.warmup_steps + args.timed_steps
    n_rows = steps * args.global_batch  # exactly one epoch on both sides
    rows = read_rows("builtin:sft_train")[:n_rows]
    if len(rows) < n_rows:
        raise SystemExit(f"builtin:sft_train has {len(rows)} rows, need {n_rows}")
    tokenizer = load_tokenizer(common.smollm2_path())
    report = DataReport("train")
    examples = build_sft_examples(rows, tokenizer, DataConfig(train="builtin:sft_train", max_length=args.max_length),
                                  True, report)
    if len(examples) != n_rows:
        raise SystemExit(f"{n_rows - len(examples)} rows dropped by tokenization; the sides would differ")
    order = GlobalBatchSampler(len(examples), Layout, SEED).epoch_order(0)
    path = workdir / "trl_train.jsonl"
    with open(path, "w") as handle:
        for i in order:
            handle.write(json.dumps({"input_ids": examples[i].input_ids, "labels": examples[i].labels}) + "\n")
    return {"rows": n_rows, "steps": steps, "path": str(path), "tokens": report.tokens,
            "targets": report.trainable_tokens, "pad_id": tokenizer.pad_token_id}


# ---------------------------------------------------------------------------
# Our side: the real stage through the CLI
# ---------------------------------------------------------------------------


def side_env(args) -> dict:
    extra = {}
    if args.threads:
        extra = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    return common.bench_env(extra)


def run_ours(args, data: dict, workdir: Path, tag: str = "ours") -> common.StepLog:
    out = workdir / tag
    sets = {
        "output_dir": str(out),
        "seed": SEED,
        "model.name_or_path": "smollm2-135m",
        "data.train": "builtin:sft_train",
        "data.eval": "null",
        "data.max_rows": data["rows"],
        "data.max_length": args.max_length,
        "train.global_batch_size": args.global_batch,
        "train.micro_batch_size": args.micro_batch,
        "train.max_steps": data["steps"],
        "train.learning_rate": LR,
        "train.lr_scheduler": "cosine",
        "train.warmup_steps": 2,
        "train.weight_decay": 0.0,
        "train.max_grad_norm": 1.0,
        "train.precision": args.precision,
        "train.eval_interval": 0,
        "train.save_interval": 0,
        "train.log_interval": 1,
        "model.gradient_checkpointing": "false",
        "lora.enabled": "true" if args.lora else "false",
        "sft.assistant_only_loss": "true",
        "sft.gold_eval.prompts": "null",
        "logging.wandb": "disabled",
    }
    if args.lora:
        sets.update({"lora.r": 16, "lora.alpha": 32, "lora.dropout": 0.0, "lora.target_modules": "[all-linear]"})
    if args.zero_stage is not None:
        sets["deepspeed.zero_stage"] = args.zero_stage
    cmd = [common.PYTHON, "-m", "alignment.cli", "sft", str(RECIPE.relative_to(common.REPO))]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    common.run_logged(cmd, workdir / f"{tag}.log", tag, env=side_env(args))
    log = common.ours_steps_from_metrics(out / "metrics.jsonl")
    if len(log.seconds) != data["steps"]:
        raise RuntimeError(f"ours: {len(log.seconds)} steps in metrics.jsonl, expected {data['steps']}")
    return log


# ---------------------------------------------------------------------------
# TRL's side: SFTTrainer in a subprocess (this file in worker mode)
# ---------------------------------------------------------------------------


def run_trl(args, data: dict, workdir: Path, tag: str = "trl") -> common.StepLog:
    spec = {
        "data": data["path"], "steps": data["steps"], "global_batch": args.global_batch,
        "micro_batch": args.micro_batch, "max_length": args.max_length, "precision": args.precision,
        "lora": args.lora, "output_dir": str(workdir / tag), "result": str(workdir / f"{tag}_result.json"),
    }
    spec_path = workdir / f"{tag}_spec.json"
    spec_path.write_text(json.dumps(spec))
    common.run_logged([common.PYTHON, str(Path(__file__).resolve()), "--trl-worker", str(spec_path)],
                      workdir / f"{tag}.log", tag, env=side_env(args))
    result = json.loads(Path(spec["result"]).read_text())
    return common.StepLog.from_dict(result)


def trl_worker(spec_path: str) -> None:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    spec = json.loads(Path(spec_path).read_text())
    records = common.read_jsonl(Path(spec["data"]))
    dataset = Dataset.from_list(records)
    accumulation = spec["global_batch"] // spec["micro_batch"]
    config = SFTConfig(
        output_dir=spec["output_dir"],
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=accumulation,
        learning_rate=LR,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=spec["precision"] == "bf16",
        use_cpu=not torch.cuda.is_available(),  # transformers refuses bf16 on a machine without a GPU otherwise
        max_length=spec["max_length"],
        gradient_checkpointing=False,  # ours does not checkpoint activations either (TRL's default is True)
        train_sampling_strategy="sequential",  # the rows arrive in our sampler's order
        dataloader_num_workers=0,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=SEED,
    )
    peft_config = None
    if spec["lora"]:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    clock = common.make_step_clock()
    trainer = SFTTrainer(model=common.smollm2_path(), args=config, train_dataset=dataset,
                         peft_config=peft_config, callbacks=[clock])
    counter = common.CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    print(f"torch threads {torch.get_num_threads()}, optimizer {config.optim}, bf16 {config.bf16}, "
          f"gradient checkpointing {config.gradient_checkpointing}", flush=True)
    trainer.train()
    n = len(clock.seconds)
    if len(counter.tokens) != n * accumulation:
        raise RuntimeError(f"{len(counter.tokens)} batches collated for {n} steps x {accumulation} micro-batches")
    log = common.StepLog()
    for step in range(n):
        part = slice(step * accumulation, (step + 1) * accumulation)
        log.add(sum(counter.tokens[part]), sum(counter.targets[part]), clock.seconds[step])
    if abs(sum(log.tokens) - trainer._total_train_tokens) > 0.5:  # TRL's own count of attention-mask tokens
        raise RuntimeError(f"token count mismatch: collator {sum(log.tokens)} vs TRL {trainer._total_train_tokens}")
    log.losses = clock.losses
    Path(spec["result"]).write_text(json.dumps(log.as_dict()))


# ---------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.trl_worker:
        trl_worker(args.trl_worker)
        return 0
    if args.global_batch % args.micro_batch:
        raise SystemExit("--global-batch must be a multiple of --micro-batch")
    started = time.perf_counter()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-sft-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        data = build_data(args, workdir)
        mode = "LoRA r16/a32 all-linear" if args.lora else "full fine-tune"
        print(f"sft-vs-trl: smollm2-135m, {mode}, {args.precision}, {data['rows']} rows of builtin:sft_train "
              f"({data['tokens']} tokens, {data['targets']} supervised), max_length {args.max_length}, "
              f"global batch {args.global_batch} (micro {args.micro_batch}), {data['steps']} steps "
              f"({args.warmup_steps} warm-up + {args.timed_steps} timed), AdamW lr {LR:g}; "
              f"torch threads per side {args.threads or common.torch_threads()}", flush=True)
        runners = {"ours": run_ours, "trl": run_trl}
        sides = [args.only] if args.only else ["ours", "trl"]
        best: dict[str, common.Throughput] = {}
        logs: dict[str, common.StepLog] = {}
        for round_ in range(args.rounds):
            for side in sides if round_ % 2 == 0 else sides[::-1]:  # alternate who goes first
                tag = side if args.rounds == 1 else f"{side}-{round_ + 1}"
                log = runners[side](args, data, workdir, tag)
                result = common.steady_throughput(side, log, args.warmup_steps)
                if args.rounds > 1:
                    print(f"[{tag}] {result.rate:.1f} tokens/s over {result.steps} timed steps", flush=True)
                if side not in best or result.rate > best[side].rate:
                    best[side], logs[side] = result, log
        rows = [best[side] for side in sides]
        if args.rounds > 1:
            print(f"best of {args.rounds} rounds per side:")
        common.print_table(rows, args.warmup_steps)
        if len(logs) == 2:  # sanity: both sides train the same thing (TRL logs a mean loss every 10 steps)
            (ours_log, trl_log) = logs["ours"], logs["trl"]
            same = ours_log.tokens == trl_log.tokens and ours_log.targets == trl_log.targets
            print(f"per-step tokens and supervised targets identical on both sides: {'yes' if same else 'NO'}")
            if not same:
                raise RuntimeError("the two sides did not process the same batches")
            for step, trl_loss in trl_log.losses:
                ours_loss = sum(ours_log.losses[:step]) / step
                print(f"mean train loss over steps 1-{step}: ours {ours_loss:.4f}, trl {trl_loss:.4f}")
        for r in rows:
            if r.all_tokens != data["tokens"] or r.all_targets != data["targets"]:
                raise RuntimeError(f"{r.name} processed {r.all_tokens:.0f} tokens / {r.all_targets:.0f} supervised, "
                                   f"expected {data['tokens']} / {data['targets']}")
        print(f"both sides processed the same {data['tokens']} tokens with {data['targets']} supervised targets; "
              f"benchmark wall time {time.perf_counter() - started:.0f}s")
        if args.only is None:
            ours, peer = rows
            common.result_line(RESULT_NAME, ours.rate, peer.rate, "tokens/s")
            last = "" if args.rounds == 1 else f"-{args.rounds}"
            common.memory_line(RESULT_NAME, "ours" + last, "trl" + last)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
