"""Memory-lean autograd for the decoder's RMSNorm and SwiGLU MLP, for models that train.

Per token and layer, plain autograd keeps for the backward each RMSNorm's input upcast to fp32 (4h
bytes) and its normalised output in the training dtype, and for the MLP the SiLU's input and output,
the up projection and their product. These functions keep the RMSNorm's input in its own dtype plus
one fp32 scale per row, and the MLP's two projections, and recompute the rest in the backward, as
Liger-Kernel's fused RMSNorm and SwiGLU do on GPU. For SmolLM2 in bf16 that is 17 KB instead of 27 KB
per token and layer (see alignment/cluster/estimate.py).

The forward is transformers' LlamaRMSNorm / LlamaMLP arithmetic, op for op, so outputs are bit for bit
the same; the SwiGLU backward is autograd's own ops (bit for bit too) and the RMSNorm backward is the
closed form of the same derivative, equal to rounding (tests/core/test_lean_layers.py).

`make_lean(model)` patches every module whose class's forward is exactly LlamaRMSNorm's or LlamaMLP's
(with SiLU); Llama, Qwen2/3, Mistral and SmolLM2 share them, anything else is left alone. Without
gradients (rollouts, evaluation) the patched forward runs the original code.
"""

from __future__ import annotations

import inspect
import types

import torch
import torch.nn.functional as F


class RMSNormFunction(torch.autograd.Function):
    """y = w * (x / sqrt(mean(x^2) + eps)), normalised in fp32 and cast back to x's dtype before the scale
    (Zhang & Sennrich 2019, eq. 4; transformers' LlamaRMSNorm order of operations).

    x: [..., H]; weight: [H]. Keeps x (its dtype) and rstd [..., 1] (fp32) for the backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.to(torch.float32)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        normed32 = x.to(torch.float32) * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_out * normed32.to(x.dtype)).sum_to_size(weight.shape).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = (grad_out * weight).to(torch.float32)  # the gradient at the fp32 normalised value
            # d/dx of x * rsqrt(mean(x^2) + eps): rstd * (g - n * mean(g * n)), n = x * rstd
            grad_x = (rstd * (g - normed32 * (g * normed32).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_weight, None


class SiluMulFunction(torch.autograd.Function):
    """SwiGLU's gated product silu(gate) * up (Shazeer 2020, eq. 5 without the output projection).

    gate, up: [..., I]. Keeps gate and up; silu(gate) is recomputed in the backward, whose ops are the
    ones autograd would run (mul, then aten.silu_backward), so gradients are bit for bit autograd's.
    """

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:
            grad_gate = torch.ops.aten.silu_backward(grad_out * up, gate)
        if ctx.needs_input_grad[1]:
            grad_up = grad_out * F.silu(gate)
        return grad_gate, grad_up


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return type(self).forward(self, hidden_states)
    return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return type(self).forward(self, x)
    return self.down_proj(SiluMulFunction.apply(self.gate_proj(x), self.up_proj(x)))


_SOURCES: dict = {}


def _forward_source(cls) -> str:
    if cls not in _SOURCES:
        try:
            _SOURCES[cls] = inspect.getsource(cls.forward)
        except (OSError, TypeError, AttributeError):
            _SOURCES[cls] = ""
    return _SOURCES[cls]


def _references() -> tuple[str, str]:
    from transformers.models.llama import modeling_llama

    return _forward_source(modeling_llama.LlamaRMSNorm), _forward_source(modeling_llama.LlamaMLP)


def _is_silu(act) -> bool:
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


def make_lean(model: torch.nn.Module) -> dict[str, int]:
    """Patch the RMSNorm and SwiGLU MLP modules of `model` in place; returns how many of each."""
    norm_source, mlp_source = _references()
    counts = {"rmsnorm": 0, "mlp": 0}
    for module in model.modules():
        source = _forward_source(type(module))
        if not source or "forward" in vars(module):
            continue
        if source == norm_source and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rms_norm_forward, module)
            counts["rmsnorm"] += 1
        elif source == mlp_source and _is_silu(getattr(module, "act_fn", None)):
            module.forward = types.MethodType(_mlp_forward, module)
            counts["mlp"] += 1
    return counts
