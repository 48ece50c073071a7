"""From sequence scores to per-token rewards (torch only).

A response's score (reward models, verifiers, functions) belongs to its last token: the EOS when
it has one, else the last generated token (FAILURES row 10: never the padding after it). With
the KL penalty in the reward (Ziegler et al., 2019, eq. 2; Ouyang et al., 2022, eq. 2), every
response token also pays -beta x its KL estimate.

Shapes: scores [B]; kl, mask [B, T].
"""

from __future__ import annotations

import torch


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
