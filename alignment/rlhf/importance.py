"""When the rollout's numerics are not the training pass's: how far apart they are, and truncated importance
sampling to correct for it (pure functions of tensors, torch only).

A rollout samples each token from pi_rollout (the decoding path: a KV cache, its own kernels, bf16 logits); the
loss computes pi_old, the same weights through the training pass. In fp32 the two agree to ~1e-5; in bf16 they
can differ by tenths of a nat on a token, so the policy gradient is taken for samples of a slightly different
policy than the one it differentiates. Truncated importance sampling (TIS; Yao et al., 2025, "Your Efficient RL
Framework Secretly Brings You Off-Policy RL Training"; TRL's `vllm_importance_sampling_mode` token_truncate and
sequence_truncate, verl's rollout importance sampling) weights each token's policy-gradient loss by

    token level:     w_t = min(pi_old(y_t) / pi_rollout(y_t), C)
    sequence level:  w_t = min(prod_s pi_old(y_s) / pi_rollout(y_s), C)   for every token of the response

with the cap C bounding the variance. The weights carry no gradient. Shapes: [B, T] over response tokens, mask 1
on the response.
"""

from __future__ import annotations

import torch


def truncated_importance_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                                 level: str = "token", cap: float = 2.0) -> torch.Tensor:
    """Weights [B, T] (1 off the mask, and on rows whose rollout log-probs are unknown: NaN, as for a
    reference answer put in by guidance, which was not sampled)."""
    if level not in ("token", "sequence"):
        raise ValueError(f"level must be 'token' or 'sequence', got {level!r}")
    diff = torch.nan_to_num((old_logp - rollout_logp) * mask, nan=0.0)
    if level == "sequence":
        diff = diff.sum(dim=-1, keepdim=True).expand_as(mask)
    weights = torch.exp(diff).clamp(max=cap)
    return torch.where(mask > 0, weights, torch.ones_like(weights)).detach()


def mismatch_stats(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """How far the rollout's log-probs are from the training pass's, over sampled tokens (rows with a NaN left
    out): the mean and max |log pi_old - log pi_rollout| per token, and the spread of the per-sequence ratio
    prod_t pi_old / pi_rollout (its mean, std, min, max)."""
    known = ~torch.isnan(rollout_logp).any(dim=-1)
    if not bool(known.any()):
        return {}
    diff = (old_logp[known] - rollout_logp[known]) * mask[known]
    tokens = mask[known].sum().clamp(min=1.0)
    ratios = torch.exp(diff.sum(dim=-1).double())
    return {"mismatch/logprob_diff_mean": float(diff.abs().sum() / tokens),
            "mismatch/logprob_diff_max": float(diff.abs().max()),
            "mismatch/seq_ratio_mean": float(ratios.mean()),
            "mismatch/seq_ratio_std": float(ratios.std()) if ratios.numel() > 1 else 0.0,
            "mismatch/seq_ratio_min": float(ratios.min()), "mismatch/seq_ratio_max": float(ratios.max())}
