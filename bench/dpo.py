"""DPO throughput: this project's `align dpo` against TRL's DPOTrainer, default and fastest.

    .venv/bin/python bench/dpo.py [--timed-steps 4] [--max-length 192] [--threads 1] [--with-ours-default]

Every side: SmolLM2-135M-Instruct, full fine-tune, the same hh-rlhf harmless-base pairs as
the same token ids in the same batches (see bench/pref_common.py), max_length, global
batch 16 as 2 micro-batches of 8, bf16, sigmoid DPO loss with beta 0.1 against the initial
model as reference, AdamW (lr 1e-6, cosine, 2 warm-up steps, no weight decay, clipping
1.0), no gradient checkpointing, no eval/saving/trackers, the same number of steps.

Sides (each its own subprocess):
- ours: `align dpo configs/smollm2/dpo-hh.yaml` with our fastest sound settings,
  dpo.reference=precomputed (reference log-probs in one pass before training, cached by
  content) and data.packing=true (padding-free pair batches, same losses). Run as
  `python -m alignment.cli dpo ...` does (alignment.cli.main) in a thin wrapper that also
  reads the process CPU time per step and times load_or_compute_reference.
- trl-default: DPOTrainer as shipped: a separate reference model, run forward on every
  batch, right-padded batches.
- trl-fastest: DPOTrainer with precompute_ref_log_probs=True (reference log-probs in one
  pass over the dataset before training). TRL's other speed options do not apply here:
  padding_free=True is disabled in TRL 1.16 (it warns and falls back to padding; it also
  needs FlashAttention, i.e. a GPU), use_liger_kernel needs Triton (GPU), activation
  offloading and pad_to_multiple_of only cost time on CPU; gradient checkpointing is off
  on every TRL side (TRL's default is on; ours never recomputes activations either).
- ours-default (only with --with-ours-default): dpo.reference=model, right-padded, the
  like-for-like counterpart of trl-default, for information.

Where TRL's CPU time goes: its fused LM head (trl.trainer.utils.add_fused_lm_head) scores
only the completion positions where Triton runs (CUDA/XPU); on CPU it projects every
position of the padded batch (prompt and padding included) onto the 49k vocabulary, with
entropy/mean-logit/top-1 metrics, and its backward recomputes those logits and runs both
gradient matmuls in fp32 (trl.kernels.chunked_logprob._addmm_fp32); no DPOConfig option
changes that. Ours applies the output layer only at the response targets. So these CPU
ratios do not carry over to a GPU.

The one-off reference precompute (ours: fingerprint + load + forward pass; TRL: model
hash + forward pass) is timed separately and printed; it is not part of pairs/s.
Throughput = pairs over the timed steps / their wall time (first --warmup-steps steps
not timed); one CPU thread per side by default (see pref_common.side_env). Ends with:

    RESULT name=dpo-vs-trl-default ours=<pairs/s> peer=<pairs/s> unit=pairs/s ratio=<ours/peer>
    RESULT name=dpo-vs-trl-fastest ours=<pairs/s> peer=<pairs/s> unit=pairs/s ratio=<ours/peer>

TRL is handed our token ids (prompt_ids/chosen_ids/rejected_ids, the columns its collator
consumes) through a subclass whose only change is that _prepare_dataset returns the
dataset as it is, instead of re-tokenizing text (see bench/pref_common.py for why).
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

RECIPE = common.REPO / "configs" / "smollm2" / "dpo-hh.yaml"
LR = 1.0e-6
BETA = 0.1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--timed-steps", type=int, default=4, help="optimizer steps timed on each side "
                   "(TRL's DPO steps take ~40-55 s each here; 4 keeps the run near 15 minutes)")
    p.add_argument("--warmup-steps", type=int, default=2, help="optimizer steps run first and not timed")
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=192, help="the recipe's (configs/smollm2/dpo-hh.yaml)")
    p.add_argument("--max-prompt-length", type=int, default=None, help="default: half of --max-length")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                   help="both sides; default bf16 where this machine runs it fast, else fp32")
    p.add_argument("--zero-stage", type=int, default=None, help="our DeepSpeed ZeRO stage (default: the recipe's)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per side (OMP_NUM_THREADS), the same on "
                   "both; 0 = torch's default (all cores). Default 1: see pref_common.side_env")
    p.add_argument("--with-ours-default", action="store_true",
                   help="also run ours with dpo.reference=model and right-padded batches (for information)")
    p.add_argument("--trl-default-checkpointing", action="store_true",
                   help="run trl-default with gradient checkpointing on, TRL's literal default (off otherwise, "
                   "like ours)")
    p.add_argument("--only", choices=["ours", "trl"], default=None, help="run one side only (no RESULT lines)")
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
# Our side: the real stage (alignment.cli.main), with the reference precompute timed
# ---------------------------------------------------------------------------


def ours_worker(spec_path: str) -> None:
    """Our stage via alignment.cli.main, timing the one-off reference precompute and its parts."""

    def install(timing: dict) -> None:
        from alignment.stages import dpo

        def timed(fn, key):
            def wrapper(*a, **kw):
                start = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    timing[key] = timing.get(key, 0.0) + time.perf_counter() - start
            return wrapper

        # The whole one-off (fingerprint, reference model load, forward pass, cache write), and its parts.
        dpo.load_or_compute_reference = timed(dpo.load_or_compute_reference, "ref_precompute_s")
        dpo.model_fingerprint = timed(dpo.model_fingerprint, "ref_hash_s")
        dpo.compute_reference_table = timed(dpo.compute_reference_table, "ref_pass_s")

    pc.run_cli_worker(spec_path, install)


def run_ours(args, s: pc.Settings, data: pc.PairData, workdir: Path, label: str, fast: bool) -> pc.PairLog:
    out = workdir / label
    sets = pc.common_sets(s, data, out, LR)
    sets.update({
        "data.packing": "true" if fast else "false",
        "dpo.loss": "sigmoid",
        "dpo.beta": BETA,
        "dpo.label_smoothing": 0.0,
        "dpo.rpo_alpha": "null",
        "dpo.reference": "precomputed" if fast else "model",
        "dpo.reference_model": "null",
        "dpo.max_prompt_length": s.max_prompt_length,
        "dpo.gold_eval.prompts": "null",
    })
    if args.zero_stage is not None:
        sets["deepspeed.zero_stage"] = args.zero_stage
    env = pc.side_env(args.threads, {"ALIGN_CACHE": str(pc.private_cache(workdir))})  # no cached reference log-probs
    log = pc.run_ours(str(Path(__file__).resolve()), "dpo", RECIPE, sets, workdir, label, s.global_batch, env)
    text = (workdir / f"{label}.log").read_text(errors="replace")
    if fast and "reference log-probs: computing" not in text:
        raise RuntimeError(f"{label}: the reference log-probs were not computed in this run (cache hit?)")
    return log


# ---------------------------------------------------------------------------
# TRL's side: DPOTrainer in a subprocess (this file in worker mode)
# ---------------------------------------------------------------------------


def trl_worker(spec_path: str) -> None:
    import torch
    import trl.trainer.dpo_trainer as dpo_module
    from trl import DPOConfig, DPOTrainer

    from alignment.core.models import load_tokenizer

    spec = json.loads(Path(spec_path).read_text())
    s = pc.Settings(**spec["settings"])
    precompute = spec["precompute"]
    timing: dict = {}

    def timed(fn, key):
        def wrapper(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                timing[key] = timing.get(key, 0.0) + time.perf_counter() - start
        return wrapper

    # The one-off: hashing the reference weights (only with precompute) + the forward pass and its dataset cache.
    dpo_module.hash_module = timed(dpo_module.hash_module, "ref_hash_s")

    class Trainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already prompt_ids / chosen_ids / rejected_ids (our tokenization)

        _precompute_ref_logps = timed(DPOTrainer._precompute_ref_logps, "ref_pass_s")

    dataset = pc.load_trl_dataset(spec["data"])
    tokenizer = load_tokenizer(common.smollm2_path())  # pad = <|im_end|>, as in our DPO stage
    trl_args = pc.trl_common_args(s, spec["output_dir"], LR)
    trl_args["gradient_checkpointing"] = bool(spec.get("gradient_checkpointing", False))
    config = DPOConfig(**trl_args, beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=precompute,
                       disable_dropout=True)
    clock = pc.step_clock()
    trainer = Trainer(model=common.smollm2_path(), args=config, train_dataset=dataset, processing_class=tokenizer,
                      callbacks=[clock])
    counter = pc.CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    print(f"torch threads {torch.get_num_threads()}, optimizer {config.optim}, bf16 {config.bf16}, gradient "
          f"checkpointing {config.gradient_checkpointing}, precompute_ref_log_probs {precompute}, separate reference "
          f"model {trainer.ref_model is not None}, trainable {trainable / 1e6:.2f}M, padding_free "
          f"{trainer.padding_free}", flush=True)
    trainer.train()
    log = pc.trl_log(counter, clock, s.accumulation)
    if precompute:
        log.extra.update(timing, ref_precompute_s=timing.get("ref_hash_s", 0.0) + timing.get("ref_pass_s", 0.0))
    Path(spec["result"]).write_text(json.dumps(log.as_dict()))


def run_trl(args, s: pc.Settings, data: pc.PairData, workdir: Path, label: str, precompute: bool,
            checkpointing: bool = False) -> pc.PairLog:
    path = workdir / "trl_train.jsonl"
    if not path.exists():
        pc.write_trl_records(data, path, "dpo")
    spec = {"settings": s.__dict__, "data": str(path), "output_dir": str(workdir / label), "precompute": precompute,
            "gradient_checkpointing": checkpointing}
    return pc.run_trl_worker(str(Path(__file__).resolve()), spec, workdir, label, pc.side_env(args.threads))


# ---------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.trl_worker:
        trl_worker(args.trl_worker)
        return 0
    if args.ours_worker:
        ours_worker(args.ours_worker)
        return 0
    s = settings(args)
    started = time.perf_counter()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        data = pc.build_pairs(s)
        print(f"dpo-vs-trl: smollm2-135m, full fine-tune, {s.precision}, sigmoid loss beta {BETA}, max_length "
              f"{s.max_length}, global batch {s.global_batch} (micro {s.micro_batch}), {s.steps} steps ({s.warmup} "
              f"warm-up + {s.steps - s.warmup} timed), AdamW lr {LR:g} cosine; torch threads "
              f"per side {args.threads or common.torch_threads()}; {pc.load_note()}", flush=True)
        print(pc.describe(s, data), flush=True)
        rows = []
        if args.only in (None, "ours"):
            rows.append(pc.Row("ours", "reference=precomputed, data.packing=true (RESULT)",
                               run_ours(args, s, data, workdir, "ours", fast=True), s.warmup))
            if args.with_ours_default:
                rows.append(pc.Row("ours-default", "reference=model, right-padded (info)",
                                   run_ours(args, s, data, workdir, "ours-default", fast=False), s.warmup))
        if args.only in (None, "trl"):
            note = "separate ref model forward per batch, padded" + (
                ", gradient checkpointing" if args.trl_default_checkpointing else "")
            log = run_trl(args, s, data, workdir, "trl-default", precompute=False,
                          checkpointing=args.trl_default_checkpointing)
            rows.append(pc.Row("trl-default", note, log, s.warmup))
            rows.append(pc.Row("trl-fastest", "precompute_ref_log_probs=True, padded",
                               run_trl(args, s, data, workdir, "trl-fastest", precompute=True), s.warmup))
        pc.print_table(f"DPO training, pairs/s ({pc.load_note()} at the end)", rows, s.warmup)
        pc.check_same_work(rows, data, s.steps)
        print(f"all sides processed the same {len(data.pairs)} pairs / {data.tokens} tokens in the same batches; "
              f"benchmark wall time {time.perf_counter() - started:.0f}s")
        if args.only is None:
            by_name = {r.name: r for r in rows}
            ours = by_name["ours"].rate
            pc.print_cpu_check(by_name["ours"], by_name["trl-default"])
            pc.print_cpu_check(by_name["ours"], by_name["trl-fastest"])
            common.result_line("dpo-vs-trl-default", ours, by_name["trl-default"].rate, "pairs/s")
            common.result_line("dpo-vs-trl-fastest", ours, by_name["trl-fastest"].rate, "pairs/s")
            common.memory_line("dpo-vs-trl-default", "ours", "trl-default")
    finally:
        pc.cleanup(workdir, keep=bool(args.workdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
