"""SFT throughput: this project's `align sft` against TRL's SFTTrainer, side by side.

    .venv/bin/python -m bench.sft [--timed-steps 12] [--max-length 128] [--lora] [--precision bf16]

Both sides get the same model (built-in SmolLM2-135M-Instruct), the same rows of
the built-in task's SFT data as the same token ids and labels (our tokenization:
chat template, loss on the assistant turn only), in the same order, the same
max_length, global/micro batch, precision, full fine-tune (or the same LoRA),
AdamW at the same LR and schedule, gradient clipping 1.0, no gradient
checkpointing, no eval/saving/trackers, dataloader workers 0 and the same number
of optimizer steps. Everything else in TRL is left at its defaults (fused AdamW,
AMP autocast for bf16, its fused LM head with entropy / token-accuracy metrics).

Each side runs in its own subprocess; ours is the real stage (`python -m
alignment.cli sft ...`, timings from its metrics.jsonl), TRL's is this module in
worker mode with a callback timing each optimizer step. Throughput =
non-padding input tokens over the timed steps / their wall time; the first
`--warmup-steps` steps of each side are not timed. Ends with:

    RESULT name=sft-vs-trl ours=<tokens/s> peer=<tokens/s> unit=tokens/s ratio=<ours/peer>

One CPU thread per side by default (bench.harness.side_env says why); `--threads 0`
uses torch's default (all cores) on both sides, the better choice on an idle machine;
`--rounds N` alternates the sides N times and keeps each side's best round.

Why pre-tokenized rows for TRL: TRL's own conversational prompt-completion path
puts the "\\n" after the assistant's <|im_end|> into the completion, so each row
would have one more input token and one more supervised token than ours (which
ends the assistant span at <|im_end|>). Handing TRL our input_ids + labels (its
documented path for processed datasets) makes the two sides' batches identical.
Tokenization is setup on both sides and outside the timed steps either way.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from bench.data import SFT_ROWS, build_sft_data
from bench.harness import (Row, Settings, StepLog, add_only_option, add_speed_options, add_workdir_option,
                           add_worker_option, argument_parser, bench_workdir, memory_line, print_table, result_line,
                           run_stage, run_trl_counted, run_worker, serve_worker, sft_log_from_metrics, side_env,
                           torch_threads, write_result)

MODULE = "bench.sft"
RESULT_NAME = "sft-vs-trl"
RECIPE = "configs/smollm2/sft.yaml"
LR = 1.0e-4


def parse_args(argv=None):
    p = argument_parser(MODULE, __doc__)
    add_speed_options(p, timed_steps=12, micro_batch=16, max_length=128)
    p.add_argument("--lora", action="store_true", help="LoRA r=16 alpha=32 on all linear layers on both sides "
                   "(default: full fine-tune)")
    p.add_argument("--rounds", type=int, default=1, help="run the sides alternately this many times each and keep "
                   "each side's best round (for a machine shared with other jobs)")
    add_only_option(p)
    add_workdir_option(p)
    add_worker_option(p)
    return p.parse_args(argv)


def run_ours(args, s: Settings, data: dict, workdir: Path, tag: str = "ours") -> StepLog:
    out = workdir / tag
    sets = s.ours_sets(SFT_ROWS, data["rows"], out, LR, {
        "lora.enabled": "true" if args.lora else "false",
        "sft.assistant_only_loss": "true",
        "sft.gold_eval.prompts": "null",
    })
    if args.lora:
        sets.update({"lora.r": 16, "lora.alpha": 32, "lora.dropout": 0.0, "lora.target_modules": "[all-linear]"})
    if args.zero_stage is not None:
        sets["deepspeed.zero_stage"] = args.zero_stage
    run_stage("sft", RECIPE, sets, workdir, tag, env=side_env(args.threads))
    log = sft_log_from_metrics(out / "metrics.jsonl")
    if len(log.seconds) != s.steps:
        raise RuntimeError(f"ours: {len(log.seconds)} steps in metrics.jsonl, expected {s.steps}")
    return log


def run_trl(args, s: Settings, data: dict, workdir: Path, tag: str = "trl") -> StepLog:
    spec = {"settings": s.__dict__, "data": data["path"], "lora": args.lora, "output_dir": str(workdir / tag)}
    return StepLog.from_dict(run_worker(MODULE, "trl", spec, workdir, tag, env=side_env(args.threads)))


def trl_worker(spec: dict) -> None:
    """TRL's side: SFTTrainer on our token ids, in our order."""
    from trl import SFTConfig, SFTTrainer

    s = Settings(**spec["settings"])
    config = SFTConfig(**s.trl_args(spec["output_dir"], LR))
    peft_config = None
    if spec["lora"]:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    trainer, log = run_trl_counted(SFTTrainer, config, spec["data"], s.accumulation,
                                   lambda t, _: f"gradient checkpointing {config.gradient_checkpointing}",
                                   targets=True, peft_config=peft_config)
    if abs(sum(log.tokens) - trainer._total_train_tokens) > 0.5:  # TRL's own count of attention-mask tokens
        raise RuntimeError(f"token count mismatch: collator {sum(log.tokens)} vs TRL {trainer._total_train_tokens}")
    write_result(spec, log.as_dict())


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return serve_worker(args.worker, {"trl": trl_worker})
    s = Settings.from_args(args)
    started = time.perf_counter()
    with bench_workdir(args.workdir, "bench-sft-") as workdir:
        data = build_sft_data(workdir / "trl_train.jsonl", s.steps, s.global_batch, s.micro_batch, s.max_length)
        mode = "LoRA r16/a32 all-linear" if args.lora else "full fine-tune"
        print(f"sft-vs-trl: smollm2-135m, {mode}, {s.precision}, {data['rows']} rows of {SFT_ROWS} "
              f"({data['tokens']} tokens, {data['targets']} supervised), {s.describe(LR)}; "
              f"torch threads per side {args.threads or torch_threads()}", flush=True)
        runners = {"ours": run_ours, "trl": run_trl}
        sides = [args.only] if args.only else ["ours", "trl"]
        best: dict[str, Row] = {}
        for round_ in range(args.rounds):
            for side in sides if round_ % 2 == 0 else sides[::-1]:  # alternate who goes first
                tag = side if args.rounds == 1 else f"{side}-{round_ + 1}"
                row = Row(side, runners[side](args, s, data, workdir, tag), s.warmup)
                if args.rounds > 1:
                    print(f"[{tag}] {row.token_rate:.1f} tokens/s over {row.steps} timed steps", flush=True)
                if side not in best or row.token_rate > best[side].token_rate:
                    best[side] = row
        rows = [best[side] for side in sides]
        if args.rounds > 1:
            print(f"best of {args.rounds} rounds per side:")
        print_table(rows, s.warmup)
        if len(rows) == 2:  # sanity: both sides train the same thing (TRL logs a mean loss every 10 steps)
            ours_log, trl_log_ = best["ours"].log, best["trl"].log
            same = ours_log.tokens == trl_log_.tokens and ours_log.targets == trl_log_.targets
            print(f"per-step tokens and supervised targets identical on both sides: {'yes' if same else 'NO'}")
            if not same:
                raise RuntimeError("the two sides did not process the same batches")
            for step, trl_loss in trl_log_.losses:
                ours_loss = sum(ours_log.losses[:step]) / step
                print(f"mean train loss over steps 1-{step}: ours {ours_loss:.4f}, trl {trl_loss:.4f}")
        for r in rows:
            if r.total("tokens") != data["tokens"] or r.total("targets") != data["targets"]:
                raise RuntimeError(f"{r.name} processed {r.total('tokens'):.0f} tokens / {r.total('targets'):.0f} "
                                   f"supervised, expected {data['tokens']} / {data['targets']}")
        print(f"both sides processed the same {data['tokens']} tokens with {data['targets']} supervised targets; "
              f"benchmark wall time {time.perf_counter() - started:.0f}s")
        if args.only is None:
            ours, peer = rows
            result_line(RESULT_NAME, ours.token_rate, peer.token_rate, "tokens/s")
            last = "" if args.rounds == 1 else f"-{args.rounds}"
            memory_line(RESULT_NAME, "ours" + last, "trl" + last)
    return 0


if __name__ == "__main__":
    sys.exit(main())
