"""Truncated importance sampling and the rollout/training mismatch metrics, against values worked out by hand."""

import math

import pytest
import torch

from alignment.rlhf.importance import mismatch_stats, truncated_importance_weights

OLD = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.3, 0.0]])
ROLLOUT = torch.tensor([[-1.5, -1.0, -0.5], [-0.2, -1.3, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def test_token_level_weights_by_hand():
    w = truncated_importance_weights(OLD, ROLLOUT, MASK, "token", cap=2.0)
    # diffs old - rollout: [0.5, -1.0, 0.0], [0.0, 1.0, (pad)]; exp: 1.6487, 0.3679, 1; 1, e=2.718 -> capped 2
    expected = torch.tensor([[math.exp(0.5), math.exp(-1.0), 1.0], [1.0, 2.0, 1.0]])
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-6)
    assert not w.requires_grad


def test_sequence_level_weights_by_hand():
    w = truncated_importance_weights(OLD, ROLLOUT, MASK, "sequence", cap=2.0)
    # row 0: sum -0.5 -> exp 0.6065 on every response token; row 1: sum 1.0 -> e capped at 2; padding 1
    expected = torch.tensor([[math.exp(-0.5)] * 3, [2.0, 2.0, 1.0]])
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-6)


def test_unknown_rollout_log_probs_get_weight_one_and_are_left_out_of_the_stats():
    rollout = ROLLOUT.clone()
    rollout[1] = float("nan")
    w = truncated_importance_weights(OLD, rollout, MASK, "token", cap=2.0)
    assert torch.equal(w[1], torch.ones(3))
    stats = mismatch_stats(OLD, rollout, MASK)
    assert stats["mismatch/logprob_diff_mean"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert stats["mismatch/logprob_diff_max"] == pytest.approx(1.0)
    assert stats["mismatch/seq_ratio_mean"] == pytest.approx(math.exp(-0.5))


def test_mismatch_stats_by_hand():
    stats = mismatch_stats(OLD, ROLLOUT, MASK)
    # |diff| over the 5 response tokens: 0.5, 1.0, 0, 0, 1.0
    assert stats["mismatch/logprob_diff_mean"] == pytest.approx(2.5 / 5)
    assert stats["mismatch/logprob_diff_max"] == pytest.approx(1.0)
    ratios = [math.exp(-0.5), math.exp(1.0)]
    assert stats["mismatch/seq_ratio_mean"] == pytest.approx(sum(ratios) / 2)
    assert stats["mismatch/seq_ratio_std"] == pytest.approx(abs(ratios[1] - ratios[0]) / math.sqrt(2))
    assert (stats["mismatch/seq_ratio_min"], stats["mismatch/seq_ratio_max"]) == pytest.approx(ratios)


def test_equal_numerics_give_weight_one_everywhere():
    w = truncated_importance_weights(OLD, OLD.clone(), MASK, "sequence")
    assert torch.equal(w, torch.ones_like(w))
