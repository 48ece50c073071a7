"""Held-out reward-model metrics: accuracy, margin, calibration, length bias (pure functions)."""

from __future__ import annotations

import torch


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Fraction of pairs with r_chosen > r_rejected (ties count as wrong)."""
    return float((chosen > rejected).float().mean())


def expected_calibration_error(margin: torch.Tensor, bins: int = 10) -> float:
    """ECE of p = sigmoid(margin) as the probability that chosen is preferred.

    Confidence is max(p, 1 - p), a prediction is correct when p > 0.5; ECE is the
    bin-size-weighted mean |accuracy - confidence| over equal-width confidence bins
    on [0.5, 1] (Guo et al., 2017, eq. 3).
    """
    p = torch.sigmoid(margin.double())
    confidence = torch.maximum(p, 1 - p)
    correct = (p > 0.5).double()
    edges = torch.linspace(0.5, 1.0, bins + 1, dtype=torch.float64)
    ece = torch.zeros((), dtype=torch.float64)
    n = margin.numel()
    for i in range(bins):
        lo, hi = edges[i], edges[i + 1]
        in_bin = (confidence >= lo) & ((confidence < hi) if i < bins - 1 else (confidence <= hi))
        if in_bin.any():
            ece += in_bin.sum() / n * (correct[in_bin].mean() - confidence[in_bin].mean()).abs()
    return float(ece)


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    x, y = x - x.mean(), y - y.mean()
    denom = (x.pow(2).sum() * y.pow(2).sum()).sqrt()
    return float((x * y).sum() / denom) if denom > 0 else 0.0


def reward_report(chosen: torch.Tensor, rejected: torch.Tensor, chosen_len: torch.Tensor,
                  rejected_len: torch.Tensor) -> dict[str, float]:
    """All eval metrics, namespaced; rewards and lengths are per pair [N]."""
    margin = chosen - rejected
    rewards = torch.cat([chosen, rejected])
    lengths = torch.cat([chosen_len, rejected_len]).to(rewards.dtype)
    return {
        "eval/accuracy": pairwise_accuracy(chosen, rejected),
        "eval/margin": float(margin.mean()),
        "eval/ece": expected_calibration_error(margin),
        "eval/length_corr": pearson(rewards, lengths),
        "eval/reward_mean": float(rewards.mean()),
        "eval/reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "eval/pairs": float(chosen.numel()),
    }
