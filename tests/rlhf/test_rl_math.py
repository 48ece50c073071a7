"""RL math by hand (alignment.rlhf: advantages, kl, ppo_losses, rewards): every function against values
worked out on paper, GAE as a loop and vectorised, and the loss aggregation split over simulated ranks."""

from __future__ import annotations

import math

import pytest
import torch

from alignment.rlhf.advantages import (
    discounted_returns,
    explained_variance,
    gae,
    gae_loop,
    group_advantages,
    leave_one_out_advantages,
    masked_mean,
    masked_var,
    masked_whiten,
)
from alignment.rlhf.kl import KLController, kl_estimate
from alignment.rlhf.ppo_losses import aggregate, entropy_from_logits, normaliser_unit, policy_loss, value_loss
from alignment.rlhf.rewards import kl_shaped_rewards, last_index, token_rewards

D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


# ---------------------------------------------------------------------------
# masked statistics
# ---------------------------------------------------------------------------


def test_masked_statistics_ignore_padding():
    x, mask = t([[1.0, 2.0, 3.0, 100.0]]), t([[1, 1, 1, 0]])
    assert masked_mean(x, mask).item() == 2.0
    assert masked_var(x, mask).item() == 1.0 and masked_var(x, mask, unbiased=False).item() == pytest.approx(2 / 3)
    torch.testing.assert_close(masked_whiten(x, mask), t([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-7, rtol=0)
    torch.testing.assert_close(masked_mean(t([[1.0, 3.0], [5.0, 7.0]]), t([[1, 1], [1, 0]]), dim=1), t([2.0, 5.0]))


# ---------------------------------------------------------------------------
# GAE (Schulman et al. 2016, eq. 16)
# ---------------------------------------------------------------------------


def test_gae_by_hand():
    # delta_2 = 1 - 0.3 = 0.7, delta_1 = 0.3 - 0.4 = -0.1, delta_0 = 0.4 - 0.5 = -0.1 (gamma 1)
    # A_2 = 0.7, A_1 = -0.1 + 0.9 * 0.7 = 0.53, A_0 = -0.1 + 0.9 * 0.53 = 0.377; returns = A + V
    rewards, values, mask = t([[0.0, 0.0, 1.0]]), t([[0.5, 0.4, 0.3]]), t([[1, 1, 1]])
    for fn in (gae, gae_loop):
        adv, ret = fn(rewards, values, mask, 1.0, 0.9)
        torch.testing.assert_close(adv, t([[0.377, 0.53, 0.7]]), atol=1e-12, rtol=0)
        torch.testing.assert_close(ret, t([[0.877, 0.93, 1.0]]), atol=1e-12, rtol=0)
    # A response that ends early: the padding's reward and value never leak in (V after the end is 0).
    # gamma 0.5, lambda 1: delta_1 = 2 - 1 = 1, delta_0 = 0.5 * 1 - 1 = -0.5; A_0 = -0.5 + 0.5 * 1 = 0
    rewards, values, mask = t([[0.0, 2.0, 5.0]]), t([[1.0, 1.0, 9.0]]), t([[1, 1, 0]])
    for fn in (gae, gae_loop):
        adv, ret = fn(rewards, values, mask, 0.5, 1.0)
        torch.testing.assert_close(adv, t([[0.0, 1.0, 0.0]]), atol=1e-12, rtol=0)
        torch.testing.assert_close(ret, t([[1.0, 2.0, 0.0]]), atol=1e-12, rtol=0)


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 0.9), (0.9, 1.0), (1.0, 0.0)])
def test_gae_loop_and_vectorised_agree(gamma, lam):
    gen = torch.Generator().manual_seed(0)
    B, T = 6, 17
    rewards, values = torch.randn(B, T, generator=gen, dtype=D), torch.randn(B, T, generator=gen, dtype=D)
    lengths = torch.tensor([17, 1, 5, 16, 9, 3])
    mask = (torch.arange(T)[None] < lengths[:, None]).to(D)
    for (a1, r1), (a2, r2) in [(gae(rewards, values, mask, gamma, lam), gae_loop(rewards, values, mask, gamma, lam))]:
        torch.testing.assert_close(a1, a2, atol=1e-10, rtol=0)
        torch.testing.assert_close(r1, r2, atol=1e-10, rtol=0)


def test_discounted_returns_by_hand():
    # G = [1 + 0.5 * (0 + 0.5 * 2), 0 + 0.5 * 2, 2] = [1.5, 1, 2]
    torch.testing.assert_close(discounted_returns(t([[1.0, 0.0, 2.0, 7.0]]), t([[1, 1, 1, 0]]), 0.5),
                               t([[1.5, 1.0, 2.0, 0.0]]), atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------
# Critic-free baselines
# ---------------------------------------------------------------------------


def test_group_advantages_by_hand():
    scores = t([1, 0, 0, 1, 1, 1, 1, 1])
    std = math.sqrt(4 * 0.25 / 3)  # unbiased std of [1, 0, 0, 1]
    expected = [0.5 / (std + 1e-6), -0.5 / (std + 1e-6), -0.5 / (std + 1e-6), 0.5 / (std + 1e-6), 0, 0, 0, 0]
    torch.testing.assert_close(group_advantages(scores, 4), t(expected), atol=1e-9, rtol=0)
    # Dr. GRPO: no division by the std
    torch.testing.assert_close(group_advantages(scores, 4, scale=False), t([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))


def test_leave_one_out_by_hand():
    # prompt 1: [1, 0, 0] -> 1 - 0, 0 - 0.5, 0 - 0.5; prompt 2: [2, 4, 6] -> 2 - 5, 4 - 4, 6 - 3
    torch.testing.assert_close(leave_one_out_advantages(t([1, 0, 0, 2, 4, 6]), 3), t([1, -0.5, -0.5, -3, 0, 3]))
    with pytest.raises(ValueError):
        leave_one_out_advantages(t([1.0]), 1)


def test_explained_variance_by_hand():
    returns, mask = t([[1.0, 2.0, 3.0]]), t([[1, 1, 1]])
    assert explained_variance(returns, returns, mask) == 1.0
    assert explained_variance(t([[2.0, 2.0, 2.0]]), returns, mask) == pytest.approx(0.0)


# ---------------------------------------------------------------------------
# KL (Schulman 2020) and the adaptive controller (Ziegler et al. 2019)
# ---------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    logp, ref = t([-1.0, -2.0]), t([-1.5, -1.5])  # log-ratios 0.5 and -0.5
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), t([0.5, -0.5]))
    torch.testing.assert_close(kl_estimate(logp, ref, "k2"), t([0.125, 0.125]))
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), t([math.exp(-0.5) - 0.5, math.exp(0.5) - 1.5]),
                               atol=1e-12, rtol=0)
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k4")


def test_k3_is_nonnegative_and_zero_at_the_reference():
    r = torch.linspace(-30, 30, 601, dtype=D)
    assert (kl_estimate(r, torch.zeros_like(r), "k3") >= 0).all()
    assert kl_estimate(t([-1.3]), t([-1.3]), "k3").item() == 0.0


def test_the_logged_kl_is_the_kl_the_reward_pays():
    # FAILURES row 26: the sequence KL (logged as objective/kl, fed to the controller) and the per-token KL in the
    # reward come from one estimate. Log-ratios [0.5, -0.5, pad] and [0.2, pad, pad], k1, beta 0.1.
    logp, ref = t([[-1.0, -2.0, -7.0], [-0.3, -5.0, -5.0]]), t([[-1.5, -1.5, 0.0], [-0.5, 0.0, 0.0]])
    mask, scores = t([[1, 1, 0], [1, 0, 0]]), t([1.0, -1.0])
    rewards, seq_kl = kl_shaped_rewards(scores, logp, ref, mask, "k1", 0.1, in_reward=True)
    torch.testing.assert_close(seq_kl, t([0.0, 0.2]), atol=1e-12, rtol=0)
    torch.testing.assert_close(rewards, t([[-0.05, 1.05, 0.0], [-1.02, 0.0, 0.0]]), atol=1e-12, rtol=0)
    torch.testing.assert_close(-(rewards.sum(dim=1) - scores) / 0.1, seq_kl, atol=1e-12, rtol=0)
    for estimator in ("k2", "k3"):
        rewards, seq_kl = kl_shaped_rewards(scores, logp, ref, mask, estimator, 0.1, in_reward=True)
        torch.testing.assert_close(seq_kl, (kl_estimate(logp, ref, estimator) * mask).sum(dim=1))
        torch.testing.assert_close(-(rewards.sum(dim=1) - scores) / 0.1, seq_kl, atol=1e-12, rtol=0)
        assert (seq_kl > 0).all()
    # The KL in the loss instead: the rewards are the scores alone, the logged KL is unchanged.
    rewards, kl_in_loss = kl_shaped_rewards(scores, logp, ref, mask, "k3", 0.1, in_reward=False)
    torch.testing.assert_close(rewards.sum(dim=1), scores)
    torch.testing.assert_close(kl_in_loss, seq_kl)


def test_adaptive_kl_controller_by_hand():
    fixed = KLController(0.1)
    fixed.update(50.0, 100)
    assert fixed.value == 0.1
    up = KLController(0.1, target=6.0, horizon=10000)
    up.update(9.0, 100)  # error 0.5 clipped to 0.2: 0.1 * (1 + 0.2 * 100 / 10000)
    assert up.value == pytest.approx(0.1 * 1.002, rel=1e-12)
    down = KLController(0.1, target=6.0, horizon=10000)
    down.update(3.0, 100)  # error -0.5 clipped to -0.2
    assert down.value == pytest.approx(0.1 * 0.998, rel=1e-12)


def test_kl_controller_reach_is_the_most_beta_can_grow():
    ctl = KLController(0.1, target=6.0, horizon=10000)
    assert ctl.reach(32, 30) == pytest.approx(1.00064 ** 30, rel=1e-12)  # about 1.019: a nominal target
    for _ in range(30):
        ctl.update(1e6, 32)  # the error clipped at +0.2 every time: the fastest growth there is
    assert ctl.value == pytest.approx(0.1 * ctl.reach(32, 30), rel=1e-12)
    assert KLController(0.1, target=6.0, horizon=96).reach(32, 30) == pytest.approx((1 + 0.2 / 3) ** 30, rel=1e-12)


# ---------------------------------------------------------------------------
# Policy and value losses (Schulman et al. 2017 eq. 7; DAPO clip-higher; dual clip)
# ---------------------------------------------------------------------------


def test_policy_loss_by_hand():
    old = t([0.0, 0.0, 0.0])
    logp = t([math.log(1.3), math.log(1.3), math.log(0.5)])
    adv = t([2.0, -1.0, -1.0])
    losses, clipped = policy_loss(logp, old, adv, 0.2, 0.2)
    # A > 0, ratio 1.3: max(-2.6, -2 * 1.2) = -2.4 (clipped); A < 0, ratio 1.3: max(1.3, 1.2) = 1.3;
    # A < 0, ratio 0.5: max(0.5, 0.8) = 0.8 (clipped)
    torch.testing.assert_close(losses, t([-2.4, 1.3, 0.8]), atol=1e-12, rtol=0)
    assert clipped.tolist() == [True, False, True]
    higher, _ = policy_loss(logp, old, adv, 0.2, 0.28)  # clip-higher: the positive side may move further
    torch.testing.assert_close(higher, t([-2.56, 1.3, 0.8]), atol=1e-12, rtol=0)
    # At the first minibatch pi == pi_old: the loss is -A and nothing is clipped.
    first, none = policy_loss(old, old, adv, 0.2, 0.2)
    torch.testing.assert_close(first, -adv) and None
    assert not none.any()


def test_dual_clip_bounds_negative_advantages():
    losses, clipped = policy_loss(t([math.log(5.0), math.log(5.0)]), t([0.0, 0.0]), t([-1.0, 1.0]), 0.2, 0.2, 3.0)
    # A < 0, ratio 5: max(5, 1.2) = 5, bounded by -c A = 3; A > 0 untouched: max(-5, -1.2) = -1.2
    torch.testing.assert_close(losses, t([3.0, -1.2]), atol=1e-12, rtol=0)
    assert clipped.tolist() == [True, True]


def test_value_loss_by_hand():
    losses, clipped = value_loss(t([1.5, 1.1]), t([1.0, 1.0]), t([2.0, 2.0]), 0.2)
    # 1.5: max((1.5 - 2)^2, (1.2 - 2)^2) / 2 = 0.32; 1.1 inside the clip: (1.1 - 2)^2 / 2 = 0.405
    torch.testing.assert_close(losses, t([0.32, 0.405]), atol=1e-12, rtol=0)
    assert clipped.tolist() == [True, False]
    unclipped, _ = value_loss(t([1.5]), t([1.0]), t([2.0]), None)
    torch.testing.assert_close(unclipped, t([0.125]))


def test_aggregation_modes_by_hand():
    losses, mask = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), t([[1, 1, 0], [1, 0, 0]])
    # token_mean: (1 + 2 + 4) / 3 tokens; seq_mean_token_sum: 7 / 2 responses;
    # seq_mean_token_mean: (3/2 + 4/1) / 2; seq_mean_token_sum_norm: 7 / 4 / 2 (max_len 4)
    expected = {"token_mean": 7 / 3, "seq_mean_token_sum": 3.5, "seq_mean_token_mean": 2.75,
                "seq_mean_token_sum_norm": 0.875}
    for mode, value in expected.items():
        denominator = mask.sum() if normaliser_unit(mode) == "tokens" else 2
        assert (aggregate(losses, mask, mode, max_len=4) / denominator).item() == pytest.approx(value, abs=1e-12), mode


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_aggregation_over_two_simulated_ranks_equals_the_whole_batch(mode):
    """OpenRLHF's loss-aggregation test idea: two data-parallel shards, each normalised by the global count."""
    gen = torch.Generator().manual_seed(1)
    losses = torch.randn(6, 9, generator=gen, dtype=D)
    mask = (torch.arange(9)[None] < torch.tensor([9, 2, 5, 1, 7, 3])[:, None]).to(D)
    count = mask.sum() if normaliser_unit(mode) == "tokens" else torch.tensor(6.0, dtype=D)
    whole = aggregate(losses, mask, mode, max_len=9) / count
    shards = sum(aggregate(losses[s], mask[s], mode, max_len=9) / count for s in (slice(0, 2), slice(2, 6)))
    torch.testing.assert_close(shards, whole, atol=1e-12, rtol=0)


def test_entropy_by_hand():
    assert entropy_from_logits(torch.zeros(1, 4)).item() == pytest.approx(math.log(4))
    assert entropy_from_logits(torch.tensor([[0.0, -1e4]])).item() == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------
# Where the score goes (FAILURES row 10)
# ---------------------------------------------------------------------------


def test_score_goes_to_the_last_response_token_never_to_padding():
    # [t0, t1, EOS, PAD, PAD], score 1, KL 0: non-zero only at index 2, summing to 1
    rewards = token_rewards(t([1.0]), t([[1, 1, 1, 0, 0]]))
    torch.testing.assert_close(rewards, t([[0.0, 0.0, 1.0, 0.0, 0.0]]))
    # a response that fills the whole length gets it at its last position
    assert token_rewards(t([1.0]), t([[1, 1, 1, 1, 1]]))[0].tolist() == [0, 0, 0, 0, 1.0]
    # with a KL penalty in the reward: -coef x kl on response tokens only
    rewards = token_rewards(t([1.0, 2.0]), t([[1, 1, 0, 0], [1, 1, 1, 1]]), t([[0.1, 0.2, 9, 9], [0.1] * 4]), 0.5)
    torch.testing.assert_close(rewards, t([[-0.05, 0.9, 0, 0], [-0.05, -0.05, -0.05, 1.95]]), atol=1e-12, rtol=0)
    assert last_index(t([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])).tolist() == [2, 0, 0]


# ---------------------------------------------------------------------------
# What stands at padding never reaches the losses (FAILURES row 24)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_values_and_logprobs_at_padding_change_neither_ppo_loss_nor_gradient(mode):
    """value_loss + aggregate and policy_loss + aggregate: any values / old values / returns, log-probs / old
    log-probs / advantages at PAD positions give the same losses and gradients, and a gradient of exactly 0 at
    PAD (tests/rlhf/test_rollout.py changes the pad *tokens*; this changes each loss input on its own)."""
    # [a, b, c, PAD, PAD] (no EOS) and [a, EOS, PAD, PAD, PAD] (verl#3805: the first row's padding counted)
    mask = t([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    pad = mask == 0
    count = mask.sum() if normaliser_unit(mode) == "tokens" else t(2.0)
    l13, l05 = math.log(1.3), math.log(0.5)
    clean = {  # response tokens as in test_value_loss_by_hand / test_policy_loss_by_hand, 0 at PAD
        "values": t([[1.5, 1.1, 0.0, 0, 0], [2.0, 1.0, 0, 0, 0]]),
        "old_values": t([[1.0, 1.0, 0.0, 0, 0], [2.0, 1.0, 0, 0, 0]]),
        "returns": t([[2.0, 2.0, 1.0, 0, 0], [1.0, 1.0, 0, 0, 0]]),
        "logp": t([[l13, l13, l05, 0, 0], [0.0, 0.0, 0, 0, 0]]),
        "old_logp": t([[0.0, 0.0, 0.0, 0, 0], [0.0, 0.0, 0, 0, 0]]),
        "advantages": t([[2.0, -1.0, -1.0, 0, 0], [1.0, -2.0, 0, 0, 0]]),
    }
    gen = torch.Generator().manual_seed(0)
    noisy = {k: torch.where(pad, 40 * torch.randn(v.shape, generator=gen, dtype=D), v) for k, v in clean.items()}
    noisy["logp"][pad], noisy["old_logp"][pad] = 3.0, -3.0  # ratio e^6 at PAD: clipped or not, never counted

    def losses_and_grads(x):
        values, logp = x["values"].clone().requires_grad_(), x["logp"].clone().requires_grad_()
        vf, _ = value_loss(values, x["old_values"], x["returns"], 0.2)
        pg, _ = policy_loss(logp, x["old_logp"], x["advantages"], 0.2, 0.2, dual_clip=3.0)
        vf_loss = aggregate(vf, mask, mode, max_len=5) / count
        pg_loss = aggregate(pg, mask, mode, max_len=5) / count
        (vf_loss + pg_loss).backward()
        return vf_loss.detach(), pg_loss.detach(), values.grad, logp.grad

    vf0, pg0, dv0, dl0 = losses_and_grads(clean)
    vf1, pg1, dv1, dl1 = losses_and_grads(noisy)
    assert vf1.item() == vf0.item() and pg1.item() == pg0.item()
    torch.testing.assert_close(dv1, dv0, atol=0, rtol=0)
    torch.testing.assert_close(dl1, dl0, atol=0, rtol=0)
    assert (dv1[pad] == 0).all() and (dl1[pad] == 0).all()
    if mode == "token_mean":
        # value: 0.32 + 0.405 + 0.5 (row 1), 0.5 + 0 (row 2) = 1.725 over 5 tokens; policy: -2.4 + 1.3 + 0.8, -1 + 2
        assert vf0.item() == pytest.approx(1.725 / 5, abs=1e-12) and pg0.item() == pytest.approx(0.7 / 5, abs=1e-12)
        # d/dV = V - R, 0 where the clipped branch wins (1.5); d/dlogp = -A ratio, 0 where clipped (1.3 with A 2, 0.5)
        torch.testing.assert_close(dv0, t([[0, -0.9, -1.0, 0, 0], [1.0, 0, 0, 0, 0]]) / 5, atol=1e-12, rtol=0)
        torch.testing.assert_close(dl0, t([[0, 1.3, 0, 0, 0], [-1.0, 2.0, 0, 0, 0]]) / 5, atol=1e-12, rtol=0)
