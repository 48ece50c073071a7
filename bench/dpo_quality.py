"""DPO quality: this project's `align dpo` against TRL's DPOTrainer, at TRL's own settings.

    .venv/bin/python -m bench.dpo_quality [--train-rows 512] [--max-length 320] [--epochs 1] [--workdir DIR]
                                          [--hh-rlhf DIR]

Both sides train SmolLM2-135M-Instruct with the sigmoid DPO loss, full fine-tune, against a
frozen copy of the starting model, on the same first --train-rows rows of the training part of
the shared hh-rlhf file (bench.data: the fixed split, 360 held-out rows neither side
sees), with TRL's DPOConfig defaults for what a user leaves unset: beta 0.1, learning rate 1e-6,
linear decay, no warm-up, no weight decay, batch 8 (no accumulation), clipping 1.0, dropout off,
bf16 autocast on CPU (ours: DeepSpeed bf16 with fp32 master weights, exported as TRL saves its fp32
weights: model.export_dtype fp32). Only max_length (TRL
default 1024; 320 here) and the epochs (TRL default 3; 1 here) are set, the same on both sides.
Each side keeps its own handling of long pairs: ours keeps the prompt's last max_length/2
tokens and cuts the responses; DPOTrainer keeps the start of each sequence (truncation_mode
keep_start) and drops a pair whose prompt alone fills max_length. Gradient checkpointing is off
on both (memory and time only).

Both exports and the starting model are then scored the plain way (transformers alone; see
bench.harness) on the held-out pairs: the implicit reward's accuracy,
log p_policy - log p_start of chosen above that of rejected. Ends with

    RESULT name=dpo-quality-vs-trl ours=<held-out accuracy> peer=<held-out accuracy> unit=accuracy ratio=<ours/peer>

and a table of the training pairs each side kept, truncated and dropped.
"""

from __future__ import annotations

import sys
import time

from bench.data import load_dataset
from bench.harness import (add_quality_options, argument_parser, ours_kept, policy_accuracy, run_quality,
                           run_quality_ours, run_quality_trl, save_export, serve_worker, smollm2_path, start_logps,
                           trl_kept, trl_quality_args)

MODULE = "bench.dpo_quality"
RESULT_NAME = "dpo-quality-vs-trl"
RECIPE = "configs/smollm2/dpo-hh.yaml"
TRL_LR = 1.0e-6  # DPOConfig's default learning_rate
TRL_BETA = 0.1  # DPOConfig's default beta


def parse_args(argv=None):
    p = argument_parser(MODULE, __doc__)
    add_quality_options(p, TRL_LR)
    p.add_argument("--beta", type=float, default=TRL_BETA)
    return p.parse_args(argv)


def trl_worker(spec: dict) -> None:
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    dataset = load_dataset(spec["data"])
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    config = DPOConfig(**trl_quality_args(spec), beta=spec["beta"])
    trainer = DPOTrainer(model=smollm2_path(), args=config, train_dataset=dataset, processing_class=tokenizer)
    kept = trainer.train_dataset
    truncated = sum(len(p) + max(len(c), len(r)) > config.max_length
                    for p, c, r in zip(kept["prompt_ids"], kept["chosen_ids"], kept["rejected_ids"]))
    print(f"DPOTrainer: lr {config.learning_rate}, beta {config.beta}, {config.lr_scheduler_type}, batch "
          f"{config.per_device_train_batch_size}, epochs {config.num_train_epochs}, bf16 {config.bf16}, "
          f"kept {len(kept)} of {len(dataset)} pairs, {truncated} cut to max_length", flush=True)
    trainer.train()
    save_export(trainer, tokenizer, spec, {"kept": len(kept), "given": len(dataset), "truncated": truncated})


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return serve_worker(args.worker, {"trl": trl_worker})

    def compare(split, workdir, records):
        t0 = time.perf_counter()
        start = start_logps(workdir, split.held)  # the starting model's: the same for every run
        print(f"[start] log-probs of the starting model on the held-out pairs in {time.perf_counter() - t0:.0f}s",
              flush=True)
        table, acc = [], {}
        if args.only in (None, "ours"):
            ours_final = run_quality_ours(args, "dpo", RECIPE, split, workdir, {
                "dpo.loss": "sigmoid", "dpo.beta": args.beta, "dpo.label_smoothing": 0.0, "dpo.reference": "model",
                "dpo.max_prompt_length": "null", "dpo.rpo_alpha": "null"})
            table.append(("ours", ours_kept(split, args.max_length, reward_model=False)))
            acc["ours"] = policy_accuracy(str(ours_final), split.held, start, "ours")
        if args.only in (None, "trl"):
            trl_final, counts = run_quality_trl(MODULE, args, workdir, records, beta=args.beta)
            table.append(("trl", trl_kept(split, counts, "pairs whose prompt fills max_length dropped, long ones cut "
                                                         "at the end (keep_start)")))
            acc["trl"] = policy_accuracy(str(trl_final), split.held, start, "trl")
        return table, acc

    return run_quality(args, "dpo", RESULT_NAME, f"smollm2-135m, sigmoid DPO, full fine-tune, reference = the "
                       f"starting model, {args.precision}, max_length {args.max_length}, batch {args.batch}, "
                       f"{args.epochs:g} epoch(s), beta {args.beta:g}, lr {args.learning_rate:g} linear, no warm-up "
                       "(DPOConfig defaults)", compare)


if __name__ == "__main__":
    sys.exit(main())
