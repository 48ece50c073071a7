"""The GPU check: every stage for a few steps on one GPU, and the CUDA-only paths, in under 8 minutes.

    .venv/bin/python -m bench.gpu_check [--steps 8] [--peak-tflops T]      (needs CUDA; never run in CI)
    .venv/bin/python -m bench.gpu_check --smoke                              (CPU, tiny model: the module's own test)

Runs, each a fresh `align` process on SmolLM2-135M-Instruct in bf16 (configs/smollm2/<stage>.yaml,
no eval, no saving, gold evaluation off):
- sft, rm, dpo and ppo (GRPO recipe) at ZeRO-2 and at ZeRO-3 on the one GPU;
- the CUDA-only paths: SFT with SDPA attention (PyTorch's flash/memory-efficient kernels), with
  attn_implementation=flash_attention_2 when the flash-attn package is installed (said so when it is
  not), and ZeRO-2 with the optimizer offloaded to pinned host memory. The fused AdamW kernel is what
  our engine picks on CUDA (alignment.core.engine); each run's log says which optimizer it built.

Per run: tokens/s over the steps after the first two (warm-up: CUDA context, kernel autotuning), the
peak GPU memory the run logged (memory/peak_allocated_mib), and model FLOPs utilisation
MFU = model FLOPs/s / peak: 6*P FLOPs per trained token, plus 2*P per token of each frozen forward
(DPO's reference, 2 sequences per pair); for PPO, 2*P per generated token plus 6*P per trained token.
The peak is --peak-tflops, else the dense bf16 peak of the GPU by name (H100/H200 SXM 989, A100 312,
L40S 362, A10G 125, RTX 4090 165). Prints per run

    RESULT name=gpu-<run>-tokens-per-s ours=<tokens/s> peer=<tokens/s of the same stage at ZeRO-2> unit=tokens/s ratio=..
    RESULT name=gpu-<run>-mfu ours=<achieved TFLOPS> peer=<peak TFLOPS> unit=TFLOPS ratio=<MFU>
"""

from __future__ import annotations

import importlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import QUIET, argument_parser, read_jsonl, result_line, run_stage

MODULE = "bench.gpu_check"
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}
NO_GOLD = {"sft": ["sft.gold_eval.prompts=null"], "dpo": ["dpo.gold_eval.prompts=null"], "rm": [], "ppo": []}
RECIPES = {"sft": "sft.yaml", "rm": "rm.yaml", "dpo": "dpo.yaml", "ppo": "grpo.yaml"}


def peak_tflops(override: float | None) -> float:
    if override:
        return override
    import torch

    name = torch.cuda.get_device_name(0)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    raise SystemExit(f"unknown GPU {name!r}: pass --peak-tflops (dense bf16)")


def runs(smoke: bool) -> list[tuple[str, str, list[str]]]:
    """(run name, stage, extra --set overrides)."""
    out = []
    for stage in ("sft", "rm", "dpo", "ppo"):
        for zero in (2, 3):
            out.append((f"{stage}-zero{zero}", stage, [f"deepspeed.zero_stage={zero}"]))
    out.append(("sft-sdpa", "sft", ["deepspeed.zero_stage=2", "model.attn_implementation=sdpa"]))
    try:
        importlib.import_module("flash_attn")
        out.append(("sft-flash-attention-2", "sft", ["deepspeed.zero_stage=2",
                                                     "model.attn_implementation=flash_attention_2"]))
    except ImportError:
        print("flash-attn is not installed: the flash_attention_2 run is skipped (SDPA's own flash kernel runs)")
    if not smoke:
        out.append(("sft-offload-pinned", "sft", ["deepspeed.zero_stage=2", "deepspeed.offload_optimizer=true"]))
    return out


def measure(metrics: list[dict], stage: str, params: float, warmup: int = 2) -> dict:
    steps = [r for r in metrics if "train/tokens_per_s" in r or "train/episodes_per_s" in r]
    timed = steps[warmup:] or steps
    peak_mem = max((r.get("memory/peak_allocated_mib", r.get("memory/peak_rss_mib", 0.0)) for r in steps), default=0.0)
    if stage == "ppo":
        generated = statistics.median(r["train/episodes_per_s"] * r["response/length"] for r in timed)
        flops = generated * 2 * params + generated * 6 * params  # sample, then train on each response token
        return {"tokens_per_s": generated, "flops": flops, "peak_mib": peak_mem}
    tokens = statistics.median(r["train/tokens_per_s"] for r in timed)
    per_token = 6 * params + (2 * params if stage == "dpo" else 0)  # DPO: the reference's forward too
    return {"tokens_per_s": tokens, "flops": tokens * per_token, "peak_mib": peak_mem}


def main(argv=None) -> int:
    p = argument_parser(MODULE, __doc__)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, fp32, 3 steps: check this script runs")
    p.add_argument("--only", nargs="+", default=None, help="run names to keep (e.g. sft-zero2 dpo-zero3)")
    args = p.parse_args(argv)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print(f"{MODULE} needs a CUDA GPU (use --smoke on CPU)", file=sys.stderr)
        return 2
    folder = "tiny" if args.smoke else "smollm2"
    steps = 3 if args.smoke else args.steps
    peak = 1.0 if args.smoke else peak_tflops(args.peak_tflops)
    started = time.perf_counter()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for name, stage, extra in runs(args.smoke):
            if args.only and name not in args.only:
                continue
            out = Path(tmp) / name
            sets = [f"output_dir={out}", f"train.max_steps={steps}", *QUIET, "logging.wandb=disabled", *NO_GOLD[stage],
                    *extra, "train.precision=fp32" if args.smoke else "train.precision=bf16"]
            wall = run_stage(stage, f"configs/{folder}/{RECIPES[stage]}", sets, Path(tmp), name, timeout=300)
            from alignment.cluster.estimate import Shape
            from alignment.core.models import resolve_model_path

            params = Shape.of(resolve_model_path("tiny-llama" if args.smoke else "smollm2-135m")).params
            results[name] = {**measure(read_jsonl(out / "metrics.jsonl"), stage, params), "wall": wall}
    print(f"\n{'run':<24} {'tokens/s':>10} {'TFLOPS':>8} {'MFU':>6} {'peak MiB':>9} {'wall s':>7}")
    for name, r in results.items():
        tflops = r["flops"] / 1e12
        print(f"{name:<24} {r['tokens_per_s']:>10.0f} {tflops:>8.2f} {tflops / peak:>6.1%} {r['peak_mib']:>9.0f} "
              f"{r['wall']:>7.0f}")
    for name, r in results.items():
        base = results.get(name.split("-")[0] + "-zero2", r)
        result_line(f"gpu-{name}-tokens-per-s", r["tokens_per_s"], base["tokens_per_s"], "tokens/s", digits=0)
        result_line(f"gpu-{name}-mfu", r["flops"] / 1e12, peak, "TFLOPS", digits=3)
    print(f"gpu check wall time {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
