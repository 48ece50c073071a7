"""The KL penalty of RLHF: per-token estimators and the coefficient's controllers (torch only).

The policy pi is kept near the reference policy pi_ref. On responses sampled from pi, with the
per-token log-ratio r_t = log pi(y_t) - log pi_ref(y_t) (logp, ref_logp: [B, T]), three
estimators of KL(pi || pi_ref) (Schulman, 2020, "Approximating KL Divergence",
http://joschu.net/blog/kl-approx.html):
- k1 = r: unbiased, high variance, negative on some tokens;
- k2 = r^2 / 2: biased, low variance, >= 0;
- k3 = exp(-r) - 1 + r: unbiased, low variance, >= 0 (GRPO's KL term, Shao et al., 2024, eq. 4).

Controllers of the coefficient beta:
- fixed;
- adaptive (Ziegler et al., 2019, "Fine-Tuning Language Models from Human Preferences", sec. 2.2):
  e = clip(KL / target - 1, -0.2, 0.2), beta <- beta (1 + e n / horizon) after n episodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL estimate [B, T] (see the module docstring); padding positions are the caller's to mask."""
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        # exp(-r) - 1 + r as expm1(-r) + r (exact near r = 0), -r clamped so exp stays finite on wild
        # tokens; >= 0 up to rounding, which the clamp removes
        neg = (-log_ratio).clamp(max=20.0)
        return (torch.expm1(neg) - neg).clamp(min=0.0)
    raise ValueError(f"unknown KL estimator {estimator!r} (k1, k2, k3)")


@dataclass
class KLController:
    """beta for the KL penalty: fixed, or adapted towards `target` (the mean sequence KL) over `horizon` episodes."""

    value: float
    target: float | None = None
    horizon: int = 10000

    def update(self, kl: float, episodes: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * episodes / self.horizon

    def reach(self, episodes: int, updates: int) -> float:
        """The most beta can grow over `updates` updates of `episodes` each (and about the most it can shrink):
        (1 + 0.2 n / horizon)^updates. With TRL's horizon of 10000 and a few dozen episodes an iteration,
        a run of 30 iterations can move beta by 2%: the target is then nominal."""
        return (1.0 + 0.2 * episodes / self.horizon) ** updates

    def state(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}
