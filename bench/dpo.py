"""DPO throughput: this project's `align dpo` against TRL's DPOTrainer, default and fastest.

    .venv/bin/python -m bench.dpo [--timed-steps 4] [--max-length 192] [--threads 1] [--with-ours-default]
                                  [--hh-rlhf DIR]

Every side: SmolLM2-135M-Instruct, full fine-tune, the same hh-rlhf harmless-base pairs as
the same token ids in the same batches (see bench.data), max_length, global
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
not timed); one CPU thread per side by default (see bench.harness.side_env). Ends with:

    RESULT name=dpo-vs-trl-default ours=<pairs/s> peer=<pairs/s> unit=pairs/s ratio=<ours/peer>
    RESULT name=dpo-vs-trl-fastest ours=<pairs/s> peer=<pairs/s> unit=pairs/s ratio=<ours/peer>

TRL is handed our token ids (prompt_ids/chosen_ids/rejected_ids, the columns its collator
consumes) through a subclass whose only change is that _prepare_dataset returns the
dataset as it is, instead of re-tokenizing text (see bench.data for why).
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench.data import PairData, add_hh_rlhf_option, write_trl_records
from bench.harness import (Row, Settings, StepLog, add_only_option, add_speed_options, add_workdir_option,
                           add_worker_option, argument_parser, memory_line, print_cpu_check, private_cache, result_line,
                           run_cli_worker, run_ours_worker, run_pair_benchmark, run_trl_counted, run_worker,
                           serve_worker, side_env, smollm2_path, timed, write_result)

MODULE = "bench.dpo"
RECIPE = "configs/smollm2/dpo-hh.yaml"
LR = 1.0e-6
BETA = 0.1


def parse_args(argv=None):
    p = argument_parser(MODULE, __doc__)
    add_speed_options(p, timed_steps=4, micro_batch=8, max_length=192, prompt_length=True,
                      timed_help=" (TRL's DPO steps take ~40-55 s each here; 4 keeps the run near 15 minutes)",
                      max_length_help="the recipe's (configs/smollm2/dpo-hh.yaml)")
    p.add_argument("--with-ours-default", action="store_true",
                   help="also run ours with dpo.reference=model and right-padded batches (for information)")
    p.add_argument("--trl-default-checkpointing", action="store_true",
                   help="run trl-default with gradient checkpointing on, TRL's literal default (off otherwise, "
                   "like ours)")
    add_only_option(p, "run one side only (no RESULT lines)")
    add_workdir_option(p)
    add_hh_rlhf_option(p)
    add_worker_option(p)
    return p.parse_args(argv)


def ours_worker(spec: dict) -> None:
    """Our stage via alignment.cli.main, timing the one-off reference precompute and its parts."""

    def install(timing: dict) -> None:
        from alignment.stages import dpo

        # The whole one-off (fingerprint, reference model load, forward pass, cache write), and its parts.
        dpo.load_or_compute_reference = timed(dpo.load_or_compute_reference, "ref_precompute_s", timing)
        dpo.model_fingerprint = timed(dpo.model_fingerprint, "ref_hash_s", timing)
        dpo.compute_reference_table = timed(dpo.compute_reference_table, "ref_pass_s", timing)

    run_cli_worker(spec, install)


def run_ours(args, s: Settings, data: PairData, workdir: Path, label: str, fast: bool) -> StepLog:
    """Our side: the real stage (alignment.cli.main), with the reference precompute timed."""
    sets = s.pair_sets(data, workdir / label, LR)
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
    env = side_env(args.threads, {"ALIGN_CACHE": str(private_cache(workdir))})  # no cached reference log-probs
    log = run_ours_worker(MODULE, "dpo", RECIPE, sets, workdir, label, s.global_batch, env)
    text = (workdir / f"{label}.log").read_text(errors="replace")
    if fast and "reference log-probs: computing" not in text:
        raise RuntimeError(f"{label}: the reference log-probs were not computed in this run (cache hit?)")
    return log


def trl_worker(spec: dict) -> None:
    """TRL's side: DPOTrainer on our token ids, in our order, the one-off precompute timed."""
    import trl.trainer.dpo_trainer as dpo_module
    from trl import DPOConfig, DPOTrainer

    from alignment.core.models import load_tokenizer

    s = Settings(**spec["settings"])
    precompute = spec["precompute"]
    timing: dict = {}
    # The one-off: hashing the reference weights (only with precompute) + the forward pass and its dataset cache.
    dpo_module.hash_module = timed(dpo_module.hash_module, "ref_hash_s", timing)

    class Trainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already prompt_ids / chosen_ids / rejected_ids (our tokenization)

        _precompute_ref_logps = timed(DPOTrainer._precompute_ref_logps, "ref_pass_s", timing)

    tokenizer = load_tokenizer(smollm2_path())  # pad = <|im_end|>, as in our DPO stage
    trl_args = s.trl_args(spec["output_dir"], LR)
    trl_args["gradient_checkpointing"] = bool(spec.get("gradient_checkpointing", False))
    config = DPOConfig(**trl_args, beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=precompute,
                       disable_dropout=True)

    def describe(trainer, trainable: int) -> str:
        return (f"gradient checkpointing {config.gradient_checkpointing}, precompute_ref_log_probs {precompute}, "
                f"separate reference model {trainer.ref_model is not None}, trainable {trainable / 1e6:.2f}M, "
                f"padding_free {trainer.padding_free}")

    _, log = run_trl_counted(Trainer, config, spec["data"], s.accumulation, describe, processing_class=tokenizer)
    if precompute:
        log.extra.update(timing, ref_precompute_s=timing.get("ref_hash_s", 0.0) + timing.get("ref_pass_s", 0.0))
    write_result(spec, log.as_dict())


def run_trl(args, s: Settings, data: PairData, workdir: Path, label: str, precompute: bool,
            checkpointing: bool = False) -> StepLog:
    path = workdir / "trl_train.jsonl"
    if not path.exists():
        write_trl_records(data, path, "dpo")
    spec = {"settings": s.__dict__, "data": str(path), "output_dir": str(workdir / label), "precompute": precompute,
            "gradient_checkpointing": checkpointing}
    return StepLog.from_dict(run_worker(MODULE, "trl", spec, workdir, label, side_env(args.threads)))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return serve_worker(args.worker, {"trl": trl_worker, "ours": ours_worker})
    s = Settings.from_args(args)

    def sides(data: PairData, workdir: Path) -> list[Row]:
        rows = []
        if args.only in (None, "ours"):
            rows.append(Row("ours", run_ours(args, s, data, workdir, "ours", fast=True), s.warmup,
                            "reference=precomputed, data.packing=true (RESULT)"))
            if args.with_ours_default:
                rows.append(Row("ours-default", run_ours(args, s, data, workdir, "ours-default", fast=False),
                                s.warmup, "reference=model, right-padded (info)"))
        if args.only in (None, "trl"):
            note = "separate ref model forward per batch, padded" + (
                ", gradient checkpointing" if args.trl_default_checkpointing else "")
            log = run_trl(args, s, data, workdir, "trl-default", precompute=False,
                          checkpointing=args.trl_default_checkpointing)
            rows.append(Row("trl-default", log, s.warmup, note))
            rows.append(Row("trl-fastest", run_trl(args, s, data, workdir, "trl-fastest", precompute=True), s.warmup,
                            "precompute_ref_log_probs=True, padded"))
        return rows

    def results(by_name: dict[str, Row]) -> None:
        ours = by_name["ours"].pair_rate
        print_cpu_check(by_name["ours"], by_name["trl-default"])
        print_cpu_check(by_name["ours"], by_name["trl-fastest"])
        result_line("dpo-vs-trl-default", ours, by_name["trl-default"].pair_rate, "pairs/s")
        result_line("dpo-vs-trl-fastest", ours, by_name["trl-fastest"].pair_rate, "pairs/s")
        memory_line("dpo-vs-trl-default", "ours", "trl-default")

    return run_pair_benchmark(args, s, "dpo", f"dpo-vs-trl: smollm2-135m, full fine-tune, {s.precision}, sigmoid "
                              f"loss beta {BETA}, {s.describe(LR)} cosine", "DPO training", sides, results)


if __name__ == "__main__":
    sys.exit(main())
