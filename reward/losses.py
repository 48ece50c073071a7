"""Reward-model losses: pure functions of reward tensors (import torch only).

Bradley-Terry (Bradley & Terry, 1952; as used for RLHF reward models in Ouyang et
al., 2022, "Training language models to follow instructions with human feedback",
eq. 1):   loss = -log sigmoid(r_chosen - r_rejected - margin)
The optional per-pair margin follows Touvron et al., 2023 (Llama 2, eq. 2). The
centring term coef * (r_chosen + r_rejected)^2 (Eisenstein et al., 2023, "Helping
or herding?") keeps rewards near zero; it matches TRL's `center_rewards_coefficient`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair loss [B] from rewards chosen [B] and rejected [B]; margin [B] or None."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def centering_penalty(chosen: torch.Tensor, rejected: torch.Tensor, coef: float) -> torch.Tensor:
    """Per-pair penalty [B]: coef * (r_chosen + r_rejected)^2."""
    return coef * (chosen + rejected) ** 2


def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                center_coef: float = 0.0) -> torch.Tensor:
    """Per-pair total loss [B]; its mean over a batch equals TRL RewardTrainer's loss on that batch."""
    loss = bradley_terry_loss(chosen, rejected, margin)
    if center_coef:
        loss = loss + centering_penalty(chosen, rejected, center_coef)
    return loss
