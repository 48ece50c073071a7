"""Tests for alignment.core.lean_layers: the lean RMSNorm and SwiGLU give transformers' outputs bit for
bit, autograd's gradients (SwiGLU bit for bit, RMSNorm to rounding), and keep fewer bytes for the
backward, on the units and on the tiny random Llama."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from alignment.core.lean_layers import RMSNormFunction, SiluMulFunction, make_lean
from alignment.core.models import load_model, resolve_model_path


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for the backward while fn() runs."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_output_is_llamas_bit_for_bit_and_gradients_agree(dtype):
    torch.manual_seed(0)
    norm = LlamaRMSNorm(64, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64) * 0.5 + 1)
    x = (torch.randn(3, 7, 64) * 3).to(dtype).requires_grad_()
    grad_out = torch.randn(3, 7, 64).to(dtype)

    expected = norm(x)
    expected_dx, expected_dw = torch.autograd.grad(expected, (x, norm.weight), grad_out)
    got = RMSNormFunction.apply(x, norm.weight, norm.variance_epsilon)
    got_dx, got_dw = torch.autograd.grad(got, (x, norm.weight), grad_out)

    assert got.dtype == expected.dtype and torch.equal(got, expected)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-2}
    torch.testing.assert_close(got_dx, expected_dx, **tol)
    torch.testing.assert_close(got_dw, expected_dw, **tol)


def test_rmsnorm_gradient_matches_a_hand_computed_value():
    # x = [3, 4], w = [1, 1], eps = 0: mean(x^2) = 12.5, rstd = 1/sqrt(12.5); y = x * rstd.
    # dy/dx for upstream [1, 0]: rstd * ([1, 0] - n * (n . [1, 0]) / 2), n = x * rstd. The function
    # normalises in fp32 (as LlamaRMSNorm does) whatever the input dtype, hence the fp32 tolerance.
    x = torch.tensor([[3.0, 4.0]], dtype=torch.float64, requires_grad=True)
    w = torch.ones(2, dtype=torch.float64, requires_grad=True)
    y = RMSNormFunction.apply(x, w, 0.0)
    dx, dw = torch.autograd.grad(y, (x, w), torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    rstd = 12.5 ** -0.5
    n = [3 * rstd, 4 * rstd]
    expected = [rstd * (1 - n[0] * n[0] / 2), rstd * (0 - n[1] * n[0] / 2)]
    torch.testing.assert_close(dx, torch.tensor([expected], dtype=torch.float64), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dw, torch.tensor([n[0], 0.0], dtype=torch.float64), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_is_autograds_bit_for_bit(dtype):
    torch.manual_seed(1)
    gate = (torch.randn(4, 5, 32) * 2).to(dtype).requires_grad_()
    up = torch.randn(4, 5, 32).to(dtype).requires_grad_()
    grad_out = torch.randn(4, 5, 32).to(dtype)

    expected = torch.nn.functional.silu(gate) * up
    expected_grads = torch.autograd.grad(expected, (gate, up), grad_out)
    got = SiluMulFunction.apply(gate, up)
    got_grads = torch.autograd.grad(got, (gate, up), grad_out)
    assert torch.equal(got, expected)
    for g, e in zip(got_grads, expected_grads):
        assert torch.equal(g, e)


def test_the_lean_units_keep_fewer_bytes_for_backward():
    torch.manual_seed(2)
    hidden, inner, tokens = 64, 160, 50
    norm = LlamaRMSNorm(hidden).to(torch.bfloat16)
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16, requires_grad=True)
    _, plain = saved_bytes(lambda: norm(x))
    _, lean = saved_bytes(lambda: RMSNormFunction.apply(x, norm.weight, norm.variance_epsilon))
    # plain: fp32 input (4h) + bf16 normalised (2h) per token; lean: bf16 input (2h) + one fp32 scale
    assert plain >= tokens * hidden * 6 and lean <= tokens * (hidden * 2 + 4) + hidden * 2

    gate = torch.randn(tokens, inner, dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn(tokens, inner, dtype=torch.bfloat16, requires_grad=True)
    _, plain = saved_bytes(lambda: torch.nn.functional.silu(gate) * up)
    _, lean = saved_bytes(lambda: SiluMulFunction.apply(gate, up))
    assert plain == 3 * tokens * inner * 2 and lean == 2 * tokens * inner * 2


@pytest.fixture(scope="module")
def tiny():
    return load_model(resolve_model_path("tiny-llama"), attn_implementation="eager")


def test_make_lean_on_the_tiny_llama_same_loss_and_gradients_less_kept(tiny):
    torch.manual_seed(3)
    plain = copy.deepcopy(tiny).train()
    lean = copy.deepcopy(tiny).train()
    counts = make_lean(lean)
    layers = lean.config.num_hidden_layers
    assert counts == {"rmsnorm": 2 * layers + 1, "mlp": layers}
    assert make_lean(lean) == {"rmsnorm": 0, "mlp": 0}  # patched once

    ids = torch.randint(0, lean.config.vocab_size, (2, 24))

    def loss_of(model):
        return model(input_ids=ids, labels=ids).loss

    plain_loss, plain_kept = saved_bytes(lambda: loss_of(plain))
    lean_loss, lean_kept = saved_bytes(lambda: loss_of(lean))
    assert torch.equal(plain_loss, lean_loss)
    assert lean_kept < plain_kept
    plain_loss.backward()
    lean_loss.backward()
    for (name, p), (_, q) in zip(plain.named_parameters(), lean.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)

    # Without gradients the patched modules run transformers' own forward.
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, lean(input_ids=ids).logits)


def test_make_lean_leaves_other_norms_and_activations_alone():
    class OtherNorm(torch.nn.Module):  # Gemma-style (1 + w) scale: not LlamaRMSNorm's forward
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(8))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return x * (1 + self.weight)

    class Config:
        hidden_size, intermediate_size, mlp_bias, hidden_act = 8, 16, False, "gelu"

    model = torch.nn.ModuleList([OtherNorm(), LlamaMLP(Config())])
    assert make_lean(model) == {"rmsnorm": 0, "mlp": 0}
    assert "forward" not in vars(model[0]) and "forward" not in vars(model[1])
