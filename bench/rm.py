"""Reward-model training throughput: this project's `align rm` against TRL's RewardTrainer.

    .venv/bin/python -m bench.rm [--timed-steps 6] [--max-length 192] [--threads 1] [--only ours|trl] [--hh-rlhf DIR]

Both sides: SmolLM2-135M-Instruct with a scalar head (AutoModelForSequenceClassification,
num_labels=1), full fine-tune (our rm.trainable_layers: null), the same hh-rlhf
harmless-base pairs as the same token ids in the same batches (see bench.data),
max_length, global batch 16 as 2 micro-batches of 8, bf16, AdamW (lr 5e-5, cosine,
2 warm-up steps, no weight decay, clipping 1.0), Bradley-Terry loss with the centring
term 0.01 (TRL: center_rewards_coefficient), no gradient checkpointing, no
eval/saving/trackers, the same number of optimizer steps. TRL keeps its other defaults
(fused AdamW, AMP autocast for bf16, fp32 master weights, right-padded [2B, T] batches,
its only layout).

Sides, each a fresh process:
- `ours`: `python -m alignment.cli rm configs/smollm2/rm-hh.yaml --set ...` with the
  recipe's own layout and attention: pairs packed without padding, each pair one
  [prompt | chosen | rejected] segment whose prompt runs once (data.packing, rm.share_prompt),
  and the attention kernel our loader picks (SDPA for these block-masked rows; eager on CPU for
  other rows up to 512 tokens).
- `ours-padded`: the same with data.packing=false (right-padded [2B, T] rows), to show
  what the layout is worth (--no-padded skips it).
- `trl`: RewardTrainer with its defaults (SDPA attention): the RESULT `rm-vs-trl`.
- `trl-eager`: RewardTrainer loading the model with attn_implementation="eager", the
  kernel ours-padded uses on CPU, i.e. TRL's fastest setting here: the RESULT `rm-vs-trl-eager`.

Throughput = pairs over the timed steps / their wall time (first --warmup-steps steps of
each side not timed); one CPU thread per side by default (see bench.harness.side_env). Ends with:

    RESULT name=rm-vs-trl ours=<pairs/s> peer=<pairs/s> unit=pairs/s ratio=<ours/peer>
    RESULT name=rm-vs-trl-eager ours=<pairs/s> peer=<pairs/s> unit=pairs/s ratio=<ours/peer>
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench.data import PairData, add_hh_rlhf_option, write_trl_records
from bench.harness import (Row, Settings, StepLog, add_only_option, add_speed_options, add_workdir_option,
                           add_worker_option, argument_parser, memory_line, print_cpu_check, result_line,
                           run_cli_worker, run_ours_worker, run_pair_benchmark, run_trl_counted, run_worker,
                           serve_worker, side_env, smollm2_path, write_result)

MODULE = "bench.rm"
RESULT_NAME = "rm-vs-trl"
RECIPE = "configs/smollm2/rm-hh.yaml"
LR = 5.0e-5
CENTER_COEF = 0.01  # the recipe's rm.center_coef


def parse_args(argv=None):
    p = argument_parser(MODULE, __doc__)
    add_speed_options(p, timed_steps=6, micro_batch=8, max_length=192, prompt_length=True,
                      max_length_help="the recipe's (configs/smollm2/rm-hh.yaml)")
    add_only_option(p)
    p.add_argument("--no-padded", action="store_true", help="skip our right-padded run (data.packing=false)")
    p.add_argument("--set", dest="ours_sets", action="append", default=[], metavar="KEY=VALUE",
                   help="extra recipe override for our side (repeatable), for A/B runs, e.g. model.lean_activations=false")
    add_workdir_option(p)
    add_hh_rlhf_option(p)
    add_worker_option(p)
    return p.parse_args(argv)


def run_ours(args, s: Settings, data: PairData, workdir: Path, label: str) -> StepLog:
    """Our side: the real stage through the CLI (in the wrapper that reads CPU time per step)."""
    sets = s.pair_sets(data, workdir / label, LR)
    sets.update({
        "rm.trainable_layers": "null",  # full fine-tune, like TRL
        "rm.max_prompt_length": s.max_prompt_length,
        "rm.center_coef": CENTER_COEF,
        "rm.use_margin": "true",  # no margins in hh-rlhf: no effect
        "rm.head_init_std": "null",
    })
    if label == "ours-padded":
        sets["data.packing"] = "false"
    if args.zero_stage is not None:
        sets["deepspeed.zero_stage"] = args.zero_stage
    for item in args.ours_sets:
        key, _, value = item.partition("=")
        sets[key] = value
    return run_ours_worker(MODULE, "rm", RECIPE, sets, workdir, label, s.global_batch, side_env(args.threads))


def trl_worker(spec: dict) -> None:
    """TRL's side: RewardTrainer on our token ids, in our order."""
    from types import SimpleNamespace

    from trl import RewardConfig, RewardTrainer

    from alignment.core.models import load_tokenizer
    from reward.model import ensure_distinct_pad

    s = Settings(**spec["settings"])
    # The same tokenizer as ours, with a pad distinct from EOS: transformers' sequence-classification
    # pooling finds the last token by pad id, and our sequences end with <|im_end|> (= EOS).
    tokenizer = load_tokenizer(smollm2_path())
    ensure_distinct_pad(tokenizer, SimpleNamespace(config=SimpleNamespace()))
    init = {"attn_implementation": spec["attn"]} if spec.get("attn") else None
    config = RewardConfig(**s.trl_args(spec["output_dir"], LR), center_rewards_coefficient=CENTER_COEF,
                          disable_dropout=True, model_init_kwargs=init)

    def describe(trainer, trainable: int) -> str:
        return (f"attention {trainer.model.config._attn_implementation}, gradient checkpointing "
                f"{config.gradient_checkpointing}, trainable {trainable / 1e6:.2f}M, pad {tokenizer.pad_token!r}")

    _, log = run_trl_counted(RewardTrainer, config, spec["data"], s.accumulation, describe,
                             processing_class=tokenizer)
    write_result(spec, log.as_dict())


def run_trl(args, s: Settings, data: PairData, workdir: Path, attn: str | None = None) -> StepLog:
    path = workdir / "trl_train.jsonl"
    write_trl_records(data, path, "rm")
    label = f"trl-{attn}" if attn else "trl"
    spec = {"settings": s.__dict__, "data": str(path), "output_dir": str(workdir / label), "attn": attn}
    return StepLog.from_dict(run_worker(MODULE, "trl", spec, workdir, label, side_env(args.threads)))


def shared_prompt_note(s: Settings, data: PairData) -> str:
    """The layout `ours` runs (the header above describes padded and separately packed batches)."""
    from alignment.data.layout import collate_pairs

    slots = real = 0
    for start in range(0, len(data.order), s.micro_batch):
        batch = collate_pairs([data.pairs[i] for i in data.order[start : start + s.micro_batch]], data.pad_id,
                              s.max_length, share_prompt=True)
        slots += batch["input_ids"].numel()
        real += int(batch["attention_mask"].sum())
    return (f"ours runs shared-prompt packed micro-batches: {real} tokens through the model (each prompt once) "
            f"in {slots} token slots ({100 * (1 - real / slots):.0f}% padding)")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return serve_worker(args.worker, {"trl": trl_worker, "ours": run_cli_worker})
    s = Settings.from_args(args)

    def sides(data: PairData, workdir: Path) -> list[Row]:
        print(shared_prompt_note(s, data), flush=True)
        rows = []
        if args.only in (None, "ours"):
            rows.append(Row("ours", run_ours(args, s, data, workdir, "ours"), s.warmup,
                            "align rm as the recipe says: shared-prompt packed pairs, SDPA attention"))
            if not args.no_padded:
                rows.append(Row("ours-padded", run_ours(args, s, data, workdir, "ours-padded"), s.warmup,
                                "align rm, data.packing=false: right-padded [2B,T]"))
        if args.only in (None, "trl"):
            rows.append(Row("trl", run_trl(args, s, data, workdir), s.warmup,
                            "RewardTrainer defaults: right-padded [2B,T], SDPA attention"))
            rows.append(Row("trl-eager", run_trl(args, s, data, workdir, "eager"), s.warmup,
                            "RewardTrainer, attn_implementation=eager (its fastest here)"))
        return rows

    def results(by_name: dict[str, Row]) -> None:
        ours = by_name["ours"]
        if "ours-padded" in by_name:
            print(f"ours vs ours-padded: {ours.pair_rate / by_name['ours-padded'].pair_rate:.3f}x; "
                  f"ours-padded vs trl-eager (same layout, same attention): "
                  f"{by_name['ours-padded'].pair_rate / by_name['trl-eager'].pair_rate:.3f}x")
        print_cpu_check(ours, by_name["trl"])
        result_line(RESULT_NAME, ours.pair_rate, by_name["trl"].pair_rate, "pairs/s")
        result_line(RESULT_NAME + "-eager", ours.pair_rate, by_name["trl-eager"].pair_rate, "pairs/s")
        memory_line(RESULT_NAME, "ours", "trl")

    return run_pair_benchmark(args, s, "rm", f"{RESULT_NAME}: smollm2-135m + scalar head, full fine-tune, "
                              f"{s.precision}, {s.describe(LR)} cosine, center coef {CENTER_COEF}",
                              "reward-model training", sides, results, reward_model=True)


if __name__ == "__main__":
    sys.exit(main())
