"""Which precision a run trains in: `train.precision: auto` resolved for this device."""

from __future__ import annotations

import torch


def native_bf16() -> tuple[bool, str]:
    """Whether this process's device has fast bf16 matmuls, and the fact that says so.

    On CPU that is oneDNN's bf16 kernels (AVX512 or AMX): without them torch falls back to a reference
    bf16 GEMM, measured 45x slower than fp32 on an AVX2-only EPYC (2048x576 @ 576x1536: 3.2 s vs 0.07 s).
    """
    if torch.cuda.is_available():
        ok = torch.cuda.is_bf16_supported()
        return ok, f"this CUDA device {'supports' if ok else 'does not support'} bf16"
    ok = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    capability = torch.backends.cpu.get_cpu_capability()
    return ok, f"this CPU ({capability}) {'has' if ok else 'has no'} oneDNN bf16 kernels"


def resolve_precision(requested: str) -> tuple[str, str | None]:
    """The precision a run trains in for `train.precision: requested`, and a line to print about it.

    auto = bf16 where the device has fast bf16 matmuls, else fp32. An explicit bf16 is kept, with a warning
    where it is slow."""
    if requested not in ("auto", "bf16", "bf16-mixed"):
        return requested, None
    ok, why = native_bf16()
    if requested == "auto":
        chosen = "bf16" if ok else "fp32"
        return chosen, f"train.precision auto -> {chosen}: {why}"
    if ok:
        return requested, None
    return requested, (f"warning: train.precision {requested}, but {why}: bf16 matmuls run tens of times slower than fp32 "
                    "here; set train.precision: auto (or fp32)")


