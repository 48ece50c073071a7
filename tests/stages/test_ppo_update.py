"""The actor's loss on a rollout's first minibatch: pi_old is the training pass itself (ratio exactly 1), so a
stored old-logp pass with bf16-sized noise neither clips tokens nor bends the gradient; the truncated importance
weights are taken against the same pass. Later minibatches read the stored pass."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import align_cache  # noqa: F401
from alignment.core.models import resolve_model_path
from alignment.core.modeling import response_logprobs
from alignment.core.recipes import PPOConfig
from alignment.rlhf.episodes import training_layout
from alignment.stages.ppo import actor_loss_fn


@pytest.fixture(scope="module")
def model_and_batch(align_cache):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-llama"), dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 200, (5,), generator=g).tolist() for _ in range(4)]
    responses = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (4, 6, 3, 5)]
    batch = training_layout(prompts, responses, 1, 0, torch.device("cpu"))
    with torch.no_grad():
        exact = response_logprobs(model, batch)
    mask = batch["response_mask"]
    noise = 0.3 * torch.sign(torch.randn(exact.shape, generator=g))  # bf16-sized: tenths of a nat
    batch.update({"advantages": torch.tensor([1.0, -1.0, 1.0, -1.0])[:, None] * mask,
                  "ref_logp": exact.clone(), "old_logp": (exact + noise) * mask})
    return model, batch, exact


def loss_and_grad(model, cfg, batch, correction=None):
    model.zero_grad()
    loss, stats = actor_loss_fn(cfg, 0.0, correction)(model, batch)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return stats, grad.clone()


def test_on_policy_minibatch_uses_its_own_pass_as_pi_old(model_and_batch):
    model, batch, exact = model_and_batch
    cfg = PPOConfig(clip_low=0.2, clip_high=0.2)
    stats, grad = loss_and_grad(model, cfg, {**batch, "on_policy": True})
    assert stats["clipfrac"] == 0.0 and stats["ratio"] == stats["tokens"]  # ratio exactly 1 on every token
    # ... the stored pass's deviation is still reported (the numerics check): |exp(0.3) - 1|, |exp(-0.3) - 1|.
    assert stats["ratio_dev"] / stats["tokens"] == pytest.approx((math.exp(0.3) - 1 + 1 - math.exp(-0.3)) / 2,
                                                                 abs=0.06)
    # The same gradient as with an exact stored pass, and not the one the noisy stored pass gives.
    _, exact_grad = loss_and_grad(model, cfg, {**batch, "old_logp": exact, "on_policy": False})
    torch.testing.assert_close(grad, exact_grad, rtol=1e-5, atol=1e-7)
    noisy_stats, noisy_grad = loss_and_grad(model, cfg, {**batch, "on_policy": False})
    assert noisy_stats["clipfrac"] > 0
    assert float(torch.nn.functional.cosine_similarity(noisy_grad, exact_grad, dim=0)) < 0.99


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_importance_weights_against_the_training_pass(model_and_batch, level):
    """rollout log-probs 0.1 below the training pass's on every token: token level weighs each token's loss by
    e^0.1, sequence level by min(e^(0.1 n), cap) for a response of n tokens; against the noisy stored pass the
    weights would be something else."""
    model, batch, exact = model_and_batch
    cfg = PPOConfig(rollout_correction=level, rollout_correction_cap=2.0)
    mask = batch["response_mask"]
    rollout = (exact - 0.1) * mask
    _, plain = loss_and_grad(model, cfg, {**batch, "on_policy": True})
    weighted = {**batch, "on_policy": True, "rollout_logp": rollout}
    model.zero_grad()
    loss, _ = actor_loss_fn(cfg, 0.0, level)(model, weighted)
    lengths = mask.sum(-1)
    factor = torch.full_like(lengths, math.exp(0.1)) if level == "token" else torch.exp(0.1 * lengths).clamp(max=2.0)
    model.zero_grad()
    unweighted, _ = actor_loss_fn(cfg, 0.0, None)(model, {**batch, "on_policy": True,
                                                          "advantages": batch["advantages"] * factor[:, None]})
    assert float(loss) == pytest.approx(float(unweighted), rel=1e-5)
    assert plain.norm() > 0
