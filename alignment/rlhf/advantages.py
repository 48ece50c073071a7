"""Advantages and returns for online RL on language models: pure functions of tensors (torch only).

Shapes: B episodes (prompt + one sampled response each), T response positions. `mask` [B, T] is 1
on the response's tokens (through its EOS; every generated token when it has none) and 0 on the
padding after them; it is a prefix of ones in every row. `values` [B, T] holds V(s_t), the value of
the state before response token t is emitted. `scores` [B] are sequence-level rewards.

References (equation numbers as in the arXiv versions):
- GAE: Schulman et al., 2016, "High-Dimensional Continuous Control Using Generalized Advantage
  Estimation", eq. 16: A_t = sum_l (gamma lambda)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t.
- GRPO: Shao et al., 2024, "DeepSeekMath", sec. 4.1.2 (outcome supervision): every token of
  response i gets (r_i - mean(r_group)) / std(r_group). Dr. GRPO (Liu et al., 2025, "Understanding
  R1-Zero-Like Training", sec. 3.1) drops the division by the std.
- RLOO: Ahmadian et al., 2024, "Back to Basics: Revisiting REINFORCE Style Optimization", eq. 7 (after
  Kool et al., 2019): r_i - 1/(k-1) sum_{j != i} r_j over the k samples of a prompt.
- REINFORCE++: Hu, 2025, "REINFORCE++", sec. 3: returns G_t = sum_l gamma^l r_{t+l} of the KL-shaped
  token rewards, whitened over the whole batch (no critic, no group baseline).
"""

from __future__ import annotations

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of x where mask is 1 (over everything, or along `dim`); 0 where the mask is empty."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries (Bessel-corrected by default)."""
    mean = masked_mean(x, mask)
    count = mask.sum()
    var = masked_sum((x - mean) ** 2, mask) / count.clamp(min=1)
    return var * count / (count - 1).clamp(min=1) if unbiased else var


def whiten(x: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
           shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) on the mask, 0 elsewhere; mean and var given (e.g. over all ranks)."""
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Whiten x over its masked entries [B, T] -> [B, T] (0 off the mask)."""
    return whiten(x, mask, masked_mean(x, mask), masked_var(x, mask), shift_mean, eps)


def gae_loop(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
             lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE (eq. 16) written as the recursion A_t = delta_t + gamma lambda A_{t+1}; the reference for `gae`.
    rewards, values, mask [B, T] -> (advantages, returns) [B, T]; the state after the last response
    token is terminal (V = 0)."""
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    for b in range(B):
        running = 0.0
        for t in reversed(range(T)):
            if mask[b, t] == 0:
                continue
            next_value = values[b, t + 1] if t + 1 < T and mask[b, t + 1] > 0 else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            running = delta + gamma * lam * running
            advantages[b, t] = running
    return advantages, (advantages + values) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE (eq. 16), vectorised: A = delta @ D^T with D[t, s] = (gamma lambda)^(s - t) for s >= t.
    Shapes as `gae_loop`, which gives the same numbers."""
    T = rewards.shape[1]
    mask = mask.to(rewards.dtype)
    values = values * mask
    next_values = torch.cat([values[:, 1:], values.new_zeros(values.shape[0], 1)], dim=1)
    deltas = (rewards + gamma * next_values - values) * mask
    steps = torch.arange(T, device=rewards.device)
    offset = (steps[None, :] - steps[:, None]).to(rewards.dtype)  # s - t
    discount = torch.where(offset >= 0, (gamma * lam) ** offset.clamp(min=0), torch.zeros_like(offset))
    advantages = (deltas @ discount.T) * mask
    return advantages, (advantages + values) * mask


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = sum_l gamma^l r_{t+l} within each response, [B, T] -> [B, T] (GAE with V = 0, lambda = 1)."""
    returns, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)
    return returns


def group_advantages(scores: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's outcome advantage per response [B] (B = prompts x group_size, each prompt's samples adjacent):
    (r - group mean) / (group std + eps), or r - group mean when not `scale` (Dr. GRPO)."""
    groups = scores.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def leave_one_out_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO's advantage per response [B]: r_i minus the mean of the other k - 1 samples of its prompt."""
    if group_size < 2:
        raise ValueError("leave-one-out baselines need at least 2 samples per prompt")
    groups = scores.view(-1, group_size)
    others = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).reshape(-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[returns - values] / Var[returns] over the mask: 1 is a perfect critic, 0 a constant one."""
    var_returns = masked_var(returns, mask)
    if var_returns <= 0:
        return float("nan")
    return float(1 - masked_var(returns - values, mask) / var_returns)
