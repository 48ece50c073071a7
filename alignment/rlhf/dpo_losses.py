"""Preference-optimisation losses: pure functions of per-sequence log-probs (import torch only).

Every function returns a per-pair loss [B]; a batch loss is its mean. Inputs:
policy_chosen / policy_rejected: summed log-probs of the response tokens under the
policy [B]; ref_chosen / ref_rejected: the same under the frozen reference [B];
chosen_len / rejected_len: response token counts [B] (float).

References (equation numbers as in the arXiv versions):
- DPO: Rafailov et al., 2023, "Direct Preference Optimization", eq. 7.
- Conservative DPO (label smoothing): Mitchell, 2023, "A note on DPO with noisy preferences".
- IPO: Azar et al., 2023, "A General Theoretical Paradigm to Understand Learning from
  Human Preferences", eq. 17, with log-ratios averaged per token as TRL and the IPO
  authors use it.
- Hinge / SLiC: Zhao et al., 2023, "SLiC-HF", eq. 1 (calibration term with delta = 1/beta).
- SimPO: Meng et al., 2024, "SimPO: Simple Preference Optimization with a Reference-Free
  Reward", eq. 6 (length-normalised reward, target margin gamma).
- RPO: Pang et al., 2024, "Iterative Reasoning Preference Optimization", eq. 1 (DPO plus
  an NLL term on the chosen response).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_logits(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor) -> torch.Tensor:
    """h = (log pi(yw) - log ref(yw)) - (log pi(yl) - log ref(yl)), per pair [B]."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def dpo_sigmoid_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float,
                     label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO eq. 7: -log sigmoid(beta * h). With label_smoothing eps (cDPO):
    -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)."""
    h = dpo_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    loss = -F.logsigmoid(beta * h)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-beta * h)
    return loss


def ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float,
             chosen_len: torch.Tensor, rejected_len: torch.Tensor) -> torch.Tensor:
    """IPO eq. 17 on per-token log-ratios: (h_avg - 1 / (2 beta))^2."""
    h = (policy_chosen - ref_chosen) / chosen_len.clamp(min=1) - (policy_rejected - ref_rejected) / rejected_len.clamp(min=1)
    return (h - 1 / (2 * beta)) ** 2


def hinge_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> torch.Tensor:
    """SLiC hinge: max(0, 1 - beta * h)."""
    return torch.relu(1 - beta * dpo_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected))


def simpo_loss(policy_chosen, policy_rejected, chosen_len: torch.Tensor, rejected_len: torch.Tensor, beta: float,
               gamma: float) -> torch.Tensor:
    """SimPO eq. 6 (reference-free): -log sigmoid(beta/|yw| log pi(yw) - beta/|yl| log pi(yl) - gamma)."""
    reward_margin = beta * (policy_chosen / chosen_len.clamp(min=1) - policy_rejected / rejected_len.clamp(min=1))
    return -F.logsigmoid(reward_margin - gamma)


def implicit_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """DPO's implicit rewards beta * log(pi / ref) for chosen and rejected, each [B] (no grad needed)."""
    return beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)
