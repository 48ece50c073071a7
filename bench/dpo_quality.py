"""DPO quality: this project's `align dpo` against TRL's DPOTrainer, at TRL's own settings.

    .venv/bin/python bench/dpo_quality.py [--train-rows 512] [--max-length 320] [--epochs 1] [--workdir DIR]

Both sides train SmolLM2-135M-Instruct with the sigmoid DPO loss, full fine-tune, against a
frozen copy of the starting model, on the same first --train-rows rows of the training part of
the shared hh-rlhf file (bench/quality_common.py: the fixed split, 360 held-out rows neither side
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
quality_common.py) on the held-out pairs: the implicit reward's accuracy,
log p_policy - log p_start of chosen above that of rejected. Ends with

    RESULT name=dpo-quality-vs-trl ours=<held-out accuracy> peer=<held-out accuracy> unit=accuracy ratio=<ours/peer>

and a table of the training pairs each side kept, truncated and dropped.
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
import quality_common as qc  # noqa: E402

RESULT_NAME = "dpo-quality-vs-trl"
RECIPE = "configs/smollm2/dpo-hh.yaml"
TRL_LR = 1.0e-6  # DPOConfig's default learning_rate
TRL_BETA = 0.1  # DPOConfig's default beta


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-rows", type=int, default=512, help="first N rows of the training part (both sides)")
    p.add_argument("--max-length", type=int, default=320)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=8, help="pairs per optimizer step (TRL default 8)")
    p.add_argument("--learning-rate", type=float, default=TRL_LR)
    p.add_argument("--beta", type=float, default=TRL_BETA)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--max-held-out", type=int, default=None, help="score only the first N held-out pairs (quick runs)")
    p.add_argument("--only", choices=["ours", "trl"], default=None, help="train and score one side (no RESULT)")
    p.add_argument("--workdir", default=None, help="keep outputs here (default: a temporary directory, removed)")
    p.add_argument("--recipe", default=None, help="instead: train with this recipe as it is (its data must hold "
                   "out the same rows: data.eval_fraction 0.2, seed 0) and score its export the plain way")
    p.add_argument("--trl-worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_ours(args, workdir: Path) -> Path:
    out = workdir / "ours"
    sets = {
        "output_dir": out, "seed": qc.SPLIT_SEED, "model.name_or_path": "smollm2-135m",
        "model.gradient_checkpointing": "false", "model.export_dtype": "fp32",
        "data.train": qc.DATA, "data.eval": "null", "data.eval_fraction": qc.HELD_FRACTION,
        "data.max_rows": args.train_rows, "data.max_eval_rows": 0, "data.max_length": args.max_length,
        "train.global_batch_size": args.batch, "train.micro_batch_size": args.batch,
        "train.num_epochs": args.epochs, "train.max_steps": "null", "train.learning_rate": args.learning_rate,
        "train.lr_scheduler": "linear", "train.warmup_steps": 0, "train.warmup_ratio": 0.0,
        "train.weight_decay": 0.0, "train.max_grad_norm": 1.0, "train.precision": args.precision,
        "train.eval_interval": 0, "train.eval_before_training": "false", "train.save_interval": 0,
        "dpo.loss": "sigmoid", "dpo.beta": args.beta, "dpo.label_smoothing": 0.0, "dpo.reference": "model",
        "dpo.max_prompt_length": "null", "dpo.rpo_alpha": "null",
        "lora.enabled": "false", "logging.wandb": "disabled", "logging.progress_bar": "false",
    }
    cmd = [common.PYTHON, "-m", "alignment.cli", "dpo", RECIPE]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    common.run_logged(cmd, workdir / "ours.log", "ours")
    return out / "final"


def trl_worker(spec_path: str) -> None:
    import torch
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    spec = json.loads(Path(spec_path).read_text())
    dataset = _dataset(spec["data"])
    tokenizer = AutoTokenizer.from_pretrained(common.smollm2_path())
    config = DPOConfig(
        output_dir=spec["output_dir"], num_train_epochs=spec["epochs"], per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1, learning_rate=spec["learning_rate"], beta=spec["beta"],
        max_length=spec["max_length"], bf16=spec["precision"] == "bf16", use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=False, eval_strategy="no", save_strategy="no", report_to="none", seed=qc.SPLIT_SEED,
        logging_steps=10,
    )
    trainer = DPOTrainer(model=common.smollm2_path(), args=config, train_dataset=dataset, processing_class=tokenizer)
    kept = trainer.train_dataset
    truncated = sum(len(p) + max(len(c), len(r)) > config.max_length
                    for p, c, r in zip(kept["prompt_ids"], kept["chosen_ids"], kept["rejected_ids"]))
    print(f"DPOTrainer: lr {config.learning_rate}, beta {config.beta}, {config.lr_scheduler_type}, batch "
          f"{config.per_device_train_batch_size}, epochs {config.num_train_epochs}, bf16 {config.bf16}, "
          f"kept {len(kept)} of {len(dataset)} pairs, {truncated} cut to max_length", flush=True)
    trainer.train()
    final = Path(spec["output_dir"]) / "final"
    trainer.save_model(str(final))
    tokenizer.save_pretrained(str(final))
    Path(spec["result"]).write_text(json.dumps({"kept": len(kept), "given": len(dataset), "truncated": truncated}))


def _dataset(path: str):
    from datasets import Dataset

    return Dataset.from_list(common.read_jsonl(Path(path)))


def run_trl(args, workdir: Path, records: Path) -> tuple[Path, dict]:
    spec = {"data": str(records), "output_dir": str(workdir / "trl"), "epochs": args.epochs, "batch": args.batch,
            "learning_rate": args.learning_rate, "beta": args.beta, "max_length": args.max_length,
            "precision": args.precision, "result": str(workdir / "trl_result.json")}
    spec_path = workdir / "trl_spec.json"
    spec_path.write_text(json.dumps(spec))
    common.run_logged([common.PYTHON, str(Path(__file__).resolve()), "--trl-worker", str(spec_path)],
                      workdir / "trl.log", "trl")
    return workdir / "trl" / "final", json.loads(Path(spec["result"]).read_text())


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.trl_worker:
        trl_worker(args.trl_worker)
        return 0
    started = time.perf_counter()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-dpo-quality-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if args.recipe:
            return qc.score_recipe("dpo", args.recipe, workdir, args.max_held_out, started)
        train_rows, held_rows = qc.held_out_split()
        train_rows = train_rows[: args.train_rows]
        train_pairs, rejected = qc.parse_pairs(train_rows)
        held, held_rejected = qc.parse_pairs(held_rows)
        held = held[: args.max_held_out] if args.max_held_out else held
        records = workdir / "trl_train.jsonl"
        qc.write_records(train_pairs, records)
        print(f"{RESULT_NAME}: smollm2-135m, sigmoid DPO, full fine-tune, reference = the starting model, "
              f"{args.precision}, max_length {args.max_length}, batch {args.batch}, {args.epochs:g} epoch(s), beta "
              f"{args.beta:g}, lr {args.learning_rate:g} linear, no warm-up (DPOConfig defaults); train: first "
              f"{len(train_rows)} rows of the training part of {qc.DATA} ({len(train_pairs)} usable pairs; parser "
              f"rejected {dict(rejected) or 'none'}); held out: {len(held_rows)} rows -> {len(held)} pairs scored "
              f"(parser rejected {dict(held_rejected) or 'none'})", flush=True)
        t0 = time.perf_counter()
        cached = workdir / f"start_logps_{len(held)}.json"  # the starting model's: the same for every run
        start = json.loads(cached.read_text()) if cached.exists() else qc.response_logps(common.smollm2_path(), held)
        cached.write_text(json.dumps(start))
        print(f"[start] log-probs of the starting model on the held-out pairs in {time.perf_counter() - t0:.0f}s",
              flush=True)
        table, acc = [], {}
        if args.only in (None, "ours"):
            ours_final = run_ours(args, workdir)
            report = qc.ours_data_report(train_rows, args.max_length, None, reward_model=False)
            report["note"] = "over-long pairs kept: prompt keeps its last tokens, responses cut"
            table.append(("ours", report))
            t0 = time.perf_counter()
            acc["ours"] = qc.implicit_reward_accuracy(qc.response_logps(str(ours_final), held), start, "ours", t0)
        if args.only in (None, "trl"):
            trl_final, counts = run_trl(args, workdir, records)
            table.append(("trl", {"rows": len(train_rows), "kept": counts["kept"], "truncated": counts["truncated"],
                                  "dropped": len(train_rows) - counts["kept"],
                                  "note": f"{sum(rejected.values())} rows our parser rejected were never given to it; "
                                          f"{counts['given'] - counts['kept']} pairs whose prompt fills max_length "
                                          "dropped, long ones cut at the end (keep_start)"}))
            t0 = time.perf_counter()
            acc["trl"] = qc.implicit_reward_accuracy(qc.response_logps(str(trl_final), held), start, "trl", t0)
        qc.print_data_table(table)
        print(f"benchmark wall time {time.perf_counter() - started:.0f}s")
        (workdir / "result.json").write_text(json.dumps({"accuracy": acc, "data": dict(table)}, indent=1))
        if args.only is None:
            common.result_line(RESULT_NAME, acc["ours"]["accuracy"], acc["trl"]["accuracy"], "accuracy", digits=4)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
