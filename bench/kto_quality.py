"""KTO quality: this project's `align kto` against TRL's KTOTrainer, on hh-rlhf answers labelled good or bad.

    .venv/bin/python -m bench.kto_quality [--steps 10] [--held-out 60] [--batch 8] [--max-length 320]
                                          [--no-lora] [--learning-rate LR] [--beta 0.1] [--workdir DIR] [--hh-rlhf DIR]

Data. The training pairs are the quality split's (bench.data: the fixed split of the shared hh-rlhf file,
360 held-out rows neither side sees), turned into TRL's unpaired preference shape: each pair gives a
desirable row {prompt, completion: chosen, label: true} and an undesirable row {prompt, completion:
rejected, label: false} (TRL's unpair_preference_dataset), shuffled once (seed 0), and written to
kto_train.jsonl in the work directory, ours' `data.train`. The same batches on both sides: ours shuffles
the file with its sampler (seed 0, a new order each epoch), and TRL's KTOTrainer reads its rows in order,
so TRL trains on kto_train_ours_order.jsonl, the same rows in the order our stage trains on them, epoch
after epoch; each of its batches of 8 is ours of the same step, the same answers in the same places, so
the reference point's mismatched pairs are the same too. The rows are the first --steps x --batch / 2
usable pairs of the training part, pairs whose prompt alone fills max_length left out (KTOTrainer would
drop them; neither side gets them), so that both sides see the same --steps x --batch answers, each
once per epoch (--epochs, default 1).
Each side keeps its own handling of long answers: ours keeps the prompt's last max_length/2 tokens and
cuts the answer; KTOTrainer keeps the start of the sequence (the answer's end is cut).

Settings, the same on both sides: SmolLM2-135M-Instruct, the KTO loss (beta 0.1, desirable and
undesirable weights 1), batch 8 answers per optimizer step (KTOConfig's per_device_train_batch_size;
the reference point z0 is estimated from each batch's mismatched answers, prompt i with answer i - 1,
on both sides), one epoch, AdamW, linear decay, no warm-up, no weight decay, clipping 1.0, dropout
off, bf16 autocast on CPU (ours: DeepSpeed bf16 with fp32 master weights, exported in fp32 as TRL
saves its weights), max_length 320, no gradient checkpointing. By default LoRA as
configs/smollm2/kto.yaml trains (r 16, alpha 32, all linear layers, no adapter dropout; the
reference = the policy with its adapter off, on both sides: TRL with peft_config and no ref_model) at
the recipe's learning rate 3e-4; both exports are the merged weights. --no-lora: full fine-tune
against a frozen copy of the starting model at KTOConfig's default learning rate 1e-6. Ours is
`align kto configs/smollm2/kto.yaml` with every one of these set by --set. On a batch whose answers fit
max_length the two updates are the same (tests/stages/test_kto.py: the LoRA gradients agree on a tiny
model; on SmolLM2 and 8 answers of this file, the first step's gradients have cosine 1.0000 and equal
norms).

Scoring: both exports, against the starting model, the plain way (transformers alone, fp32; see
bench.harness) on the held-out pairs: the implicit reward's accuracy, log p_policy - log p_start of
the chosen answer above that of the rejected one (beta does not change the sign), and the paired
difference of the two sides on the same pairs with its standard error. Ends with

    RESULT name=kto-quality-vs-trl ours=<held-out accuracy> peer=<held-out accuracy> unit=accuracy ratio=<ours/peer>

and a table of the answers each side kept, truncated and dropped.

Time, on 2 idle CPU cores (AMD EPYC with AVX512-bf16): the defaults, 10 steps of 8 answers (the answers
of 40 training pairs) and 60 held-out pairs scored three times (the starting model and both exports),
take about 12 minutes: about 8 of training (both sides, with start-up and export), the plain scoring
about 1.2 s per held-out pair and model (about 4 minutes). That is a small run: read the paired
difference and its standard error, not the accuracies alone (each has a standard error near 0.065 on
60 pairs). A larger one: --steps 40 --held-out 200, about 40 minutes (2026-12-07: our side 903 s, TRL's
1,057 s, each with start-up and export; scoring about 3.5 minutes per model); --held-out 0 scores all 360
held-out pairs (about 22 minutes of scoring alone). A quick check that it all runs: --steps 2
--held-out 4 (about 2.5 minutes).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

from bench.data import (SEED, SPLIT_SEED, held_out_split, hh_rlhf_file, load_dataset, parse_pairs, read_jsonl, smollm2_path,
                        write_jsonl)
from bench.harness import (_conversation_ids, add_quality_options, argument_parser, ours_precision,
                           paired_difference, policy_accuracy, run_quality, run_quality_ours, run_quality_trl,
                           save_export, serve_worker, start_logps, trl_quality_args)

MODULE = "bench.kto_quality"
RESULT_NAME = "kto-quality-vs-trl"
RECIPE = "configs/smollm2/kto.yaml"
TRL_LR = 1.0e-6  # KTOConfig's default learning_rate (full fine-tune)
LORA_LR = 3.0e-4  # configs/smollm2/kto.yaml's learning rate (LoRA)
LORA_R, LORA_ALPHA = 16, 32  # configs/smollm2/kto.yaml's adapters
TRL_BETA = 0.1  # KTOConfig's default beta (and the recipe's)
STEPS = 10  # ~12 minutes in all on 2 CPU cores: see the docstring's Time
HELD_OUT = 60


def parse_args(argv=None):
    p = argument_parser(MODULE, __doc__)
    add_quality_options(p, None)
    p.add_argument("--steps", type=int, default=STEPS,
                   help=f"optimizer steps per epoch on each side (default {STEPS}): the training rows are the "
                        "answers of the first steps x batch / 2 usable training pairs")
    p.add_argument("--held-out", dest="max_held_out", type=int,
                   help=f"score only the first N held-out pairs (default {HELD_OUT}; 0 = all 360); the same as "
                        "--max-held-out")
    p.add_argument("--beta", type=float, default=TRL_BETA)
    p.add_argument("--lora", action=argparse.BooleanOptionalAction, default=True,
                   help=f"LoRA r {LORA_R}, alpha {LORA_ALPHA} on both sides, as the recipe (default); --no-lora: "
                        "full fine-tune against a frozen copy of the starting model")
    p.set_defaults(max_held_out=HELD_OUT, train_rows=None)
    helps = {"train_rows": argparse.SUPPRESS,  # --steps sets the rows
             "batch": "answers per optimizer step (KTOConfig's per_device_train_batch_size default 8)",
             "learning_rate": f"default {LORA_LR:g} with LoRA (the recipe's), {TRL_LR:g} with --no-lora (KTOConfig's)"}
    for action in p._actions:
        action.help = helps.get(action.dest, action.help)
    args = p.parse_args(argv)
    if args.train_rows is not None:
        p.error("--train-rows: the training rows follow from --steps and --batch here")
    if args.batch < 2 or args.batch % 2:
        p.error("--batch: an even number >= 2 (each pair gives two answers; a reference point needs two)")
    if args.learning_rate is None:
        args.learning_rate = LORA_LR if args.lora else TRL_LR
    return args


def usable_pairs(pairs: list, tokenizer, max_length: int) -> list:
    """The pairs whose prompt, rendered with the generation prompt, is shorter than max_length (KTOTrainer drops
    an answer whose prompt alone fills max_length)."""
    return [p for p in pairs if len(_conversation_ids(tokenizer, p.prompt, add_generation_prompt=True)) < max_length]


def rows_for(source: str, needed: int, tokenizer, max_length: int) -> int:
    """The smallest prefix of the split's training part holding `needed` usable pairs."""
    train, _ = held_out_split(source)
    found = 0
    for n, row in enumerate(train, 1):
        found += len(usable_pairs(parse_pairs([row])[0], tokenizer, max_length))
        if found == needed:
            return n
    raise SystemExit(f"the training part of {source} has only {found} usable pairs, need {needed}")


def unpaired_rows(pairs: list) -> list[dict]:
    """Each pair as a desirable and an undesirable answer (TRL's unpaired preference shape), shuffled once."""
    rows = [{"prompt": p.prompt, "completion": answer, "label": label}
            for p in pairs for answer, label in ((p.chosen, True), (p.rejected, False))]
    random.Random(SEED).shuffle(rows)
    return rows


def in_our_order(rows: list[dict], batch: int, steps: int) -> list[dict]:
    """The rows in the order our stage trains on them (its sampler's epoch shuffles, seed SPLIT_SEED), one epoch
    after another, cut at steps x batch: read in order by KTOTrainer's sequential sampler, each of its batches
    holds our batch of the same step, in the same order, so the reference point's mismatched pairs match too."""
    from types import SimpleNamespace

    from alignment.data.sampler import GlobalBatchSampler

    sampler = GlobalBatchSampler(len(rows), SimpleNamespace(global_batch_size=batch), SPLIT_SEED)
    per_epoch = sampler.steps_per_epoch * batch  # an epoch's incomplete last batch is left out
    order = [i for epoch in range(math.ceil(steps / sampler.steps_per_epoch))
             for i in sampler.epoch_order(epoch)[:per_epoch]][: steps * batch]
    return [rows[i] for i in order]


def ours_answers(data: Path, max_length: int) -> dict:
    """What our stage keeps, truncates and drops of the answers (the loader the stage calls, same settings)."""
    from alignment.core.config import DataConfig
    from alignment.core.models import load_tokenizer
    from alignment.data.report import DataReport
    from alignment.data.sources import read_rows
    from alignment.data.unpaired import load_answers

    report = DataReport("train")
    rows = read_rows(str(data))
    kept = load_answers(rows, load_tokenizer(smollm2_path()), DataConfig(train=str(data), max_length=max_length),
                        None, report)
    return {"rows": len(rows), "kept": len(kept), "truncated": report.truncated, "dropped": len(rows) - len(kept),
            "note": "long answers kept: prompt keeps its last max_length/2 tokens, the answer is cut"}


def ours_steps(out: Path) -> int:
    return max(r["step"] for r in read_jsonl(out / "metrics.jsonl") if "train/answers_per_s" in r)


def trl_worker(spec: dict) -> None:
    from transformers import AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    dataset = load_dataset(spec["data"])
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    config = KTOConfig(**trl_quality_args(spec), beta=spec["beta"], desirable_weight=1.0, undesirable_weight=1.0)
    peft_config = None
    if spec["lora"]:
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    trainer = KTOTrainer(model=smollm2_path(), args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)
    kept = trainer.train_dataset
    truncated = sum(len(p) + len(c) > config.max_length for p, c in zip(kept["prompt_ids"], kept["completion_ids"]))
    print(f"KTOTrainer: lr {config.learning_rate}, beta {config.beta}, {config.lr_scheduler_type}, batch "
          f"{config.per_device_train_batch_size}, epochs {config.num_train_epochs}, bf16 {config.bf16}, "
          f"sampling {config.train_sampling_strategy}, LoRA {bool(peft_config)}, kept {len(kept)} of {len(dataset)} "
          f"answers, {truncated} cut to max_length", flush=True)
    trainer.train()
    if peft_config is not None:  # the plain-transformers export: base weights with the adapter merged in
        trainer.model = trainer.model.merge_and_unload()
    save_export(trainer, tokenizer, spec, {"kept": len(kept), "given": len(dataset), "truncated": truncated,
                                           "steps": trainer.state.global_step})


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return serve_worker(args.worker, {"trl": trl_worker})
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    needed = args.steps * args.batch // 2  # pairs: two answers each
    if not args.recipe:
        args.train_rows = rows_for(hh_rlhf_file(args.hh_rlhf), needed, tokenizer, args.max_length)
    steps = round(args.steps * args.epochs)

    def compare(split, workdir, _pair_records):
        pairs = usable_pairs(split.train_pairs, tokenizer, args.max_length)
        assert len(pairs) == needed, (len(pairs), needed)
        data = workdir / "kto_train.jsonl"
        rows = unpaired_rows(pairs)
        write_jsonl(rows, data)
        trl_data = workdir / "kto_train_ours_order.jsonl"  # TRL reads in order: ours' batches, one after another
        write_jsonl(in_our_order(rows, args.batch, steps), trl_data)
        print(f"data: {len(pairs)} pairs ({len(split.train_pairs) - len(pairs)} more left out: prompt fills "
              f"max_length {args.max_length}) -> {2 * len(pairs)} answers, half of them desirable, shuffled, in "
              f"{data}: {args.steps} steps of {args.batch} answers per epoch on both sides", flush=True)
        t0 = time.perf_counter()
        start = start_logps(workdir, split.held)  # the starting model's: the same for every run
        print(f"[start] log-probs of the starting model on the held-out pairs in {time.perf_counter() - t0:.0f}s",
              flush=True)
        table, acc = [], {}
        if args.only in (None, "ours"):
            final = run_quality_ours(args, "kto", RECIPE, split, workdir, {
                "data.train": str(data), "data.max_rows": "null", "data.eval_fraction": 0.0,
                "kto.beta": args.beta, "kto.desirable_weight": 1.0, "kto.undesirable_weight": 1.0,
                "kto.reference": "auto", "kto.max_prompt_length": "null", "kto.disable_dropout": "true",
                "kto.gold_eval.prompts": "null", "lora.enabled": str(args.lora).lower(), "lora.r": LORA_R,
                "lora.alpha": LORA_ALPHA, "lora.dropout": 0.0, "lora.merge_on_export": "true",
                "train.precision": ours_precision(args.precision)})
            report = ours_answers(data, args.max_length)
            report["note"] = f"{ours_steps(workdir / 'ours')} steps; {report['note']}"
            table.append(("ours", report))
            merged = final / "merged"  # LoRA: the merged export is the plain-transformers model
            acc["ours"] = policy_accuracy(str(merged if merged.is_dir() else final), split.held, start, "ours")
        if args.only in (None, "trl"):
            trl_final, counts = run_quality_trl(MODULE, args, workdir, trl_data, beta=args.beta, lora=args.lora,
                                                epochs=1)
            table.append(("trl", {"rows": counts["given"], "kept": counts["kept"], "truncated": counts["truncated"],
                                  "dropped": counts["given"] - counts["kept"],
                                  "note": f"{counts['steps']} steps; long answers cut at the end (keep_start)"}))
            acc["trl"] = policy_accuracy(str(trl_final), split.held, start, "trl")
        for name, row in table:
            if not row["note"].startswith(f"{steps} steps"):
                raise RuntimeError(f"{name}: {row['note'].split(';')[0]}, expected {steps}: the sides saw different "
                                   "numbers of answers")
        if len(acc) == 2:
            acc["paired"] = paired_difference(acc["ours"], acc["trl"])
        return table, acc

    training = (f"LoRA r {LORA_R} alpha {LORA_ALPHA}, reference = the adapter-off policy" if args.lora else
                "full fine-tune, reference = the starting model")
    return run_quality(args, "kto", RESULT_NAME, f"smollm2-135m, KTO, {training}, {args.precision}, max_length "
                       f"{args.max_length}, batch {args.batch} answers, {args.steps} steps x {args.epochs:g} "
                       f"epoch(s), beta {args.beta:g}, lr {args.learning_rate:g} linear, no warm-up", compare)


if __name__ == "__main__":
    sys.exit(main())
