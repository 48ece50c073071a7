"""KTO's loss: learning from single answers labelled good or bad (pure functions of tensors, torch only).

Ethayarajh et al., 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 8. With the implied
reward r(x, y) = log pi(y|x) - log pi_ref(y|x) (sums over the answer's tokens) and the reference point
z0 = KL(pi || pi_ref), estimated without gradient from mismatched pairs (x_i, y_j) of the same batch and
clamped at 0 (sec. 4.1; TRL pairs each prompt with the previous answer of its batch):

    desirable y:    loss = lambda_D (1 - sigmoid(beta (r(x, y) - z0)))
    undesirable y:  loss = lambda_U (1 - sigmoid(beta (z0 - r(x, y))))

The paper's value function v is lambda_D sigmoid(...) for desirable answers (lambda_U for undesirable ones);
the loss is lambda - v, which is what these return (TRL's KTOTrainer computes the same, `loss_type="kto"`).
Shapes: per-answer log-prob sums [B], labels [B] (bool: desirable).
"""

from __future__ import annotations

import torch


def kto_reference_point(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """z0: the mean log-ratio of the batch's mismatched (prompt, answer) pairs [B'], clamped at 0, no gradient."""
    return (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, z0: torch.Tensor,
             beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """Per-answer loss [B] (eq. 8, as lambda - v)."""
    logratio = policy_logps - ref_logps
    good = desirable_weight * (1 - torch.sigmoid(beta * (logratio - z0)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratio)))
    return torch.where(desirable.bool(), good, bad)
