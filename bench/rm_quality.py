"""Reward-model quality: this project's `align rm` against TRL's RewardTrainer, at TRL's own settings.

    .venv/bin/python -m bench.rm_quality [--train-rows 512] [--max-length 320] [--epochs 1] [--workdir DIR]
                                         [--hh-rlhf DIR]

Both sides train SmolLM2-135M-Instruct with a scalar head, full fine-tune, on the same first
--train-rows rows of the training part of the shared hh-rlhf file (bench.data: the fixed split,
360 held-out rows neither side sees), with TRL's RewardConfig defaults for what a
user leaves unset: learning rate 1e-4, linear decay, no warm-up, no weight decay, batch 8 (no
accumulation), gradient clipping 1.0, dropout off, no centring term, bf16 autocast on CPU
(TRL's default precision; ours: DeepSpeed bf16 with fp32 master weights, exported as TRL saves its
fp32 weights: model.export_dtype fp32). Only max_length
(TRL default 1024; 320 here, which the CPU affords) and the epochs (TRL default 3; 1 here) are
set, the same on both sides. Each side keeps its own data handling: ours packs pairs and keeps
an over-long pair (its prompt keeps its last max_length/2 tokens, the responses are cut);
RewardTrainer drops a pair with a sequence over max_length. Gradient checkpointing is off on
both (it changes memory and time, not the numbers).

Both exports are then scored the plain way (transformers alone; see bench.harness) on the
held-out pairs. Ends with

    RESULT name=rm-quality-vs-trl ours=<held-out accuracy> peer=<held-out accuracy> unit=accuracy ratio=<ours/peer>

and a table of the training pairs each side kept, truncated and dropped.
"""

from __future__ import annotations

import sys

from bench.data import load_dataset
from bench.harness import (add_quality_options, argument_parser, ours_kept, plain_reward_accuracy, run_quality,
                           run_quality_ours, run_quality_trl, save_export, serve_worker, smollm2_path, trl_kept,
                           trl_quality_args)

MODULE = "bench.rm_quality"
RESULT_NAME = "rm-quality-vs-trl"
RECIPE = "configs/smollm2/rm-hh.yaml"
TRL_LR = 1.0e-4  # RewardConfig's default learning_rate


def parse_args(argv=None):
    p = argument_parser(MODULE, __doc__)
    add_quality_options(p, TRL_LR)
    return p.parse_args(argv)


def trl_worker(spec: dict) -> None:
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    dataset = load_dataset(spec["data"])
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    config = RewardConfig(**trl_quality_args(spec))
    trainer = RewardTrainer(model=smollm2_path(), args=config, train_dataset=dataset, processing_class=tokenizer)
    kept = len(trainer.train_dataset)
    print(f"RewardTrainer: lr {config.learning_rate}, {config.lr_scheduler_type}, batch "
          f"{config.per_device_train_batch_size}, epochs {config.num_train_epochs}, bf16 {config.bf16}, "
          f"kept {kept} of {len(dataset)} pairs, pad {tokenizer.pad_token!r}", flush=True)
    trainer.train()
    save_export(trainer, tokenizer, spec, {"kept": kept, "given": len(dataset)})


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return serve_worker(args.worker, {"trl": trl_worker})

    def compare(split, workdir, records):
        table, acc = [], {}
        if args.only in (None, "ours"):
            ours_final = run_quality_ours(args, "rm", RECIPE, split, workdir, {
                "rm.trainable_layers": "null", "rm.center_coef": 0.0, "rm.head_init_std": "null",
                "rm.max_prompt_length": "null"})
            table.append(("ours", ours_kept(split, args.max_length, reward_model=True)))
            acc["ours"] = plain_reward_accuracy(str(ours_final), split.held, "ours")
        if args.only in (None, "trl"):
            trl_final, counts = run_quality_trl(MODULE, args, workdir, records)
            table.append(("trl", trl_kept(split, counts, "pairs over max_length dropped by RewardTrainer")))
            acc["trl"] = plain_reward_accuracy(str(trl_final), split.held, "trl")
        return table, acc

    return run_quality(args, "rm", RESULT_NAME, f"smollm2-135m + scalar head, full fine-tune, {args.precision}, "
                       f"max_length {args.max_length}, batch {args.batch}, {args.epochs:g} epoch(s), lr "
                       f"{args.learning_rate:g} linear, no warm-up (RewardConfig defaults)", compare)


if __name__ == "__main__":
    sys.exit(main())
