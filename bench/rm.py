"""Reward-model training throughput: this project's `align rm` against TRL's RewardTrainer.

    .venv/bin/python bench/rm.py [--timed-steps 6] [--max-length 192] [--threads 1] [--only ours|trl]

Both sides: SmolLM2-135M-Instruct with a scalar head (AutoModelForSequenceClassification,
num_labels=1), full fine-tune (our rm.trainable_layers: null), the same hh-rlhf
harmless-base pairs as the same token ids in the same batches (see bench/pref_common.py),
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
each side not timed); one CPU thread per side by default (see pref_common.side_env). Ends with:

    RESULT name=rm-vs-trl ours=<pairs/s> peer=<pairs/s> unit=pairs/s ratio=<ours/peer>
    RESULT name=rm-vs-trl-eager ours=<pairs/s> peer=<pairs/s> unit=pairs/s ratio=<ours/peer>
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import pref_common as pc  # noqa: E402

RESULT_NAME = "rm-vs-trl"
RECIPE = common.REPO / "configs" / "smollm2" / "rm-hh.yaml"
LR = 5.0e-5
CENTER_COEF = 0.01  # the recipe's rm.center_coef


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--timed-steps", type=int, default=6, help="optimizer steps timed on each side")
    p.add_argument("--warmup-steps", type=int, default=2, help="optimizer steps run first and not timed")
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=192, help="the recipe's (configs/smollm2/rm-hh.yaml)")
    p.add_argument("--max-prompt-length", type=int, default=None, help="default: half of --max-length")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                   help="both sides; default bf16 where this machine runs it fast, else fp32")
    p.add_argument("--zero-stage", type=int, default=None, help="our DeepSpeed ZeRO stage (default: the recipe's)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per side (OMP_NUM_THREADS), the same on "
                   "both; 0 = torch's default (all cores). Default 1: see pref_common.side_env")
    p.add_argument("--only", choices=["ours", "trl"], default=None, help="run one side only (no RESULT line)")
    p.add_argument("--no-padded", action="store_true", help="skip our right-padded run (data.packing=false)")
    p.add_argument("--set", dest="ours_sets", action="append", default=[], metavar="KEY=VALUE",
                   help="extra recipe override for our side (repeatable), for A/B runs, e.g. model.lean_activations=false")
    p.add_argument("--workdir", default=None, help="keep outputs here (default: a temporary directory, removed)")
    p.add_argument("--trl-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ours-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.precision = args.precision or common.default_precision()
    return args


def settings(args) -> pc.Settings:
    if args.global_batch % args.micro_batch:
        raise SystemExit("--global-batch must be a multiple of --micro-batch")
    return pc.Settings(steps=args.warmup_steps + args.timed_steps, warmup=args.warmup_steps,
                       global_batch=args.global_batch, micro_batch=args.micro_batch, max_length=args.max_length,
                       max_prompt_length=args.max_prompt_length or args.max_length // 2, precision=args.precision)


# ---------------------------------------------------------------------------
# Our side: the real stage through the CLI
# ---------------------------------------------------------------------------


def run_ours(args, s: pc.Settings, data: pc.PairData, workdir: Path, label: str) -> pc.PairLog:
    out = workdir / label
    sets = pc.common_sets(s, data, out, LR)
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
    return pc.run_ours(str(Path(__file__).resolve()), "rm", RECIPE, sets, workdir, label, s.global_batch,
                       pc.side_env(args.threads))


# ---------------------------------------------------------------------------
# TRL's side: RewardTrainer in a subprocess (this file in worker mode)
# ---------------------------------------------------------------------------


def trl_worker(spec_path: str) -> None:
    from types import SimpleNamespace

    import torch
    from trl import RewardConfig, RewardTrainer

    from alignment.core.models import load_tokenizer
    from reward.model import ensure_distinct_pad

    spec = json.loads(Path(spec_path).read_text())
    s = pc.Settings(**spec["settings"])
    dataset = pc.load_trl_dataset(spec["data"])
    # The same tokenizer as ours, with a pad distinct from EOS: transformers' sequence-classification
    # pooling finds the last token by pad id, and our sequences end with <|im_end|> (= EOS).
    tokenizer = load_tokenizer(common.smollm2_path())
    ensure_distinct_pad(tokenizer, SimpleNamespace(config=SimpleNamespace()))
    init = {"attn_implementation": spec["attn"]} if spec.get("attn") else None
    config = RewardConfig(**pc.trl_common_args(s, spec["output_dir"], LR),
                          center_rewards_coefficient=CENTER_COEF, disable_dropout=True, model_init_kwargs=init)
    clock = pc.step_clock()
    trainer = RewardTrainer(model=common.smollm2_path(), args=config, train_dataset=dataset,
                            processing_class=tokenizer, callbacks=[clock])
    counter = pc.CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    print(f"torch threads {torch.get_num_threads()}, optimizer {config.optim}, bf16 {config.bf16}, "
          f"attention {trainer.model.config._attn_implementation}, "
          f"gradient checkpointing {config.gradient_checkpointing}, trainable {trainable / 1e6:.2f}M, "
          f"pad {tokenizer.pad_token!r}", flush=True)
    trainer.train()
    log = pc.trl_log(counter, clock, s.accumulation)
    log.extra["trainable_params"] = trainable
    Path(spec["result"]).write_text(json.dumps(log.as_dict()))


def run_trl(args, s: pc.Settings, data: pc.PairData, workdir: Path, attn: str | None = None) -> pc.PairLog:
    path = workdir / "trl_train.jsonl"
    pc.write_trl_records(data, path, "rm")
    label = f"trl-{attn}" if attn else "trl"
    spec = {"settings": s.__dict__, "data": str(path), "output_dir": str(workdir / label), "attn": attn}
    return pc.run_trl_worker(str(Path(__file__).resolve()), spec, workdir, label, pc.side_env(args.threads))


# ---------------------------------------------------------------------------


def shared_prompt_note(s: pc.Settings, data: pc.PairData) -> str:
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
    if args.trl_worker:
        trl_worker(args.trl_worker)
        return 0
    if args.ours_worker:
        pc.run_cli_worker(args.ours_worker)
        return 0
    s = settings(args)
    started = time.perf_counter()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-rm-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        data = pc.build_pairs(s, reward_model=True)
        print(f"rm-vs-trl: smollm2-135m + scalar head, full fine-tune, {s.precision}, max_length {s.max_length}, "
              f"global batch {s.global_batch} (micro {s.micro_batch}), {s.steps} steps ({s.warmup} warm-up + "
              f"{s.steps - s.warmup} timed), AdamW lr {LR:g} cosine, center coef {CENTER_COEF}; "
              f"torch threads per side {args.threads or common.torch_threads()}; {pc.load_note()}", flush=True)
        print(pc.describe(s, data), flush=True)
        print(shared_prompt_note(s, data), flush=True)
        rows = []
        if args.only in (None, "ours"):
            rows.append(pc.Row("ours", "align rm as the recipe says: shared-prompt packed pairs, SDPA attention",
                               run_ours(args, s, data, workdir, "ours"), s.warmup))
            if not args.no_padded:
                rows.append(pc.Row("ours-padded", "align rm, data.packing=false: right-padded [2B,T]",
                                   run_ours(args, s, data, workdir, "ours-padded"), s.warmup))
        if args.only in (None, "trl"):
            rows.append(pc.Row("trl", "RewardTrainer defaults: right-padded [2B,T], SDPA attention",
                               run_trl(args, s, data, workdir), s.warmup))
            rows.append(pc.Row("trl-eager", "RewardTrainer, attn_implementation=eager (its fastest here)",
                               run_trl(args, s, data, workdir, "eager"), s.warmup))
        pc.print_table(f"reward-model training, pairs/s ({pc.load_note()} at the end)", rows, s.warmup)
        pc.check_same_work(rows, data, s.steps)
        print(f"all sides processed the same {len(data.pairs)} pairs / {data.tokens} tokens in the same batches; "
              f"benchmark wall time {time.perf_counter() - started:.0f}s")
        if args.only is None:
            by_name = {r.name: r for r in rows}
            ours = by_name["ours"]
            if "ours-padded" in by_name:
                print(f"ours vs ours-padded: {ours.rate / by_name['ours-padded'].rate:.3f}x; "
                      f"ours-padded vs trl-eager (same layout, same attention): "
                      f"{by_name['ours-padded'].rate / by_name['trl-eager'].rate:.3f}x")
            pc.print_cpu_check(ours, by_name["trl"])
            common.result_line(RESULT_NAME, ours.rate, by_name["trl"].rate, "pairs/s")
            common.result_line(RESULT_NAME + "-eager", ours.rate, by_name["trl-eager"].rate, "pairs/s")
            common.memory_line(RESULT_NAME, "ours", "trl")
    finally:
        pc.cleanup(workdir, keep=bool(args.workdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
