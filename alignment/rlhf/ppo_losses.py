"""PPO's losses and how they are averaged: pure functions of tensors (torch only).

Shapes: logp, old_logp, advantages, values, old_values, returns, mask: [B, T] over response
tokens (mask 1 on the response, 0 on padding).

References:
- Clipped surrogate: Schulman et al., 2017, "Proximal Policy Optimization Algorithms", eq. 7:
  L = -min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho = pi / pi_old. DAPO (Yu et al., 2025,
  "DAPO", eq. 10, "clip-higher") lets the two sides differ: clip(rho, 1 - eps_low, 1 + eps_high).
- Dual clip: Ye et al., 2020, "Mastering Complex Control in MOBA Games with Deep RL", eq. 5: for
  A < 0 the loss is also bounded by -c A (c > 1), so a huge ratio on a bad action cannot dominate.
- Clipped value loss: the PPO2 baselines / OpenAI lm-human-preferences form,
  0.5 max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2).
- Aggregation (how token losses become the step's loss; Liu et al., 2025, "Understanding R1-Zero-Like
  Training", sec. 3.1 discusses the bias of each):
  `token_mean`        sum of token losses / tokens in the global batch (DAPO's token-level loss);
  `seq_mean_token_sum`  sum over a response, mean over responses;
  `seq_mean_token_mean` mean over a response, mean over responses (GRPO as published);
  `seq_mean_token_sum_norm` sum over a response / a constant (max_new_tokens), mean over responses (Dr. GRPO).
"""

from __future__ import annotations

import torch

AGGREGATIONS = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_low: float,
                clip_high: float, dual_clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate loss [B, T] and where clipping was active [B, T] (bool)."""
    ratio = torch.exp(logp - old_logp)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    losses = torch.maximum(pg_losses, pg_losses2)
    clipped = pg_losses2 > pg_losses
    if dual_clip is not None:
        bound = -advantages * dual_clip
        dual = (advantages < 0) & (losses > bound)
        losses = torch.where(advantages < 0, torch.minimum(losses, bound), losses)
        clipped = clipped | dual
    return losses, clipped


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               clip: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token value loss [B, T] and where the clipped branch was taken [B, T] (bool)."""
    vf_losses = (values - returns) ** 2
    if clip is None:
        return 0.5 * vf_losses, torch.zeros_like(vf_losses, dtype=torch.bool)
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    vf_losses2 = (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(vf_losses, vf_losses2), vf_losses2 > vf_losses


def aggregate(losses: torch.Tensor, mask: torch.Tensor, mode: str, max_len: int | None = None) -> torch.Tensor:
    """This micro-batch's share of the step's loss numerator, a scalar; divide it by `normaliser_unit(mode)`
    counted over the whole global batch (tokens or responses), so that any split of the batch over ranks and
    micro-batches gives the same loss and gradient."""
    mask = mask.to(losses.dtype)
    per_token = losses * mask
    if mode == "token_mean":
        return per_token.sum()
    if mode == "seq_mean_token_sum":
        return per_token.sum()
    if mode == "seq_mean_token_mean":
        return (per_token.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum()
    if mode == "seq_mean_token_sum_norm":
        if not max_len:
            raise ValueError("seq_mean_token_sum_norm needs max_len (max_new_tokens)")
        return per_token.sum() / max_len
    raise ValueError(f"unknown loss aggregation {mode!r}; choose from {', '.join(AGGREGATIONS)}")


def normaliser_unit(mode: str) -> str:
    """What the global denominator of `aggregate` counts: response 'tokens' or 'sequences'."""
    return "tokens" if mode == "token_mean" else "sequences"


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax over the last dimension, in nats: logsumexp(z) - sum softmax(z) z."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)
