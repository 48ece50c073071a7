"""From sequence scores to per-token rewards (torch only).

A response's score (reward models, verifiers, functions) belongs to its last token: the EOS when
it has one, else the last generated token (FAILURES row 10: never the padding after it). With
the KL penalty in the reward (Ziegler et al., 2019, eq. 2; Ouyang et al., 2022, eq. 2), every
response token also pays -beta x its KL estimate.

Shapes: scores [B]; kl, mask [B, T].
"""

from __future__ import annotations

import torch

from alignment.rlhf.kl import kl_estimate


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """[B] index of each row's last response token (mask is a prefix of ones; an empty row gives 0)."""
    return (mask.sum(dim=1).long() - 1).clamp(min=0)


def token_rewards(scores: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None = None,
                  kl_coef: float = 0.0) -> torch.Tensor:
    """Per-token rewards [B, T]: -kl_coef x kl on response tokens, plus the score at the last one."""
    mask = mask.to(scores.dtype)
    rewards = torch.zeros_like(mask) if kl is None else -kl_coef * kl * mask
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last_index(mask)] += scores * (mask.sum(dim=1) > 0)
    return rewards


def kl_shaped_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                      estimator: str, kl_coef: float, in_reward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token rewards [B, T], sequence KL [B]) from one KL estimate, so the KL that is logged
    (`objective/kl`, the KL controller's input) is the KL the reward pays (FAILURES row 26: TRL logged
    one estimator and penalised another). Without `in_reward` (the KL goes into the loss) the rewards
    are the scores alone.

    logp, ref_logp, mask: [B, T] (the rollout policy's and the reference's log-probs of the sampled tokens).
    """
    kl = kl_estimate(logp, ref_logp, estimator) * mask
    return token_rewards(scores, mask, kl if in_reward else None, kl_coef), kl.sum(dim=1)
