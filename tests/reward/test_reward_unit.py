"""Unit tests for the reward model: Bradley-Terry loss by hand and against TRL's RewardTrainer,
the score position (FAILURES rows 8, 9), held-out metrics, and RewardScorer's normalisation guard.

fp32 on CPU with the tiny random Llama (and the SmolLM2 tokenizer/model where its real chat
template, with pad == eos, matters).
"""

from __future__ import annotations

import math

import pytest
import torch

from alignment.data.report import DataReport
from alignment.data.sources import Row
from alignment.core.config import DataConfig
from alignment.core.models import load_model, load_tokenizer, resolve_model_path
from alignment.data.layout import collate_pairs
from alignment.data.preference import load_pairs
from reward.losses import bradley_terry_loss, centering_penalty, reward_loss
from reward.metrics import expected_calibration_error, pairwise_accuracy, pearson, reward_report
from reward.model import batch_rewards, ensure_distinct_pad, last_token_index, sequence_rewards
from reward.scorer import RewardScorer


D = torch.float64


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_path():
    return resolve_model_path("tiny-llama")


@pytest.fixture(scope="module")
def tiny_tok(tiny_path):
    return load_tokenizer(tiny_path)


def _tiny_reward(tiny_path, tok, seed: int = 0):
    model = load_model(tiny_path, "reward").eval()
    ensure_distinct_pad(tok, model)
    # The new head's default init (std 0.02) gives rewards near 0; a unit-std head makes
    # every comparison below sensitive to the position read and to the hidden state.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def tiny_rm(tiny_path, tiny_tok):
    return _tiny_reward(tiny_path, tiny_tok)


PAIR_ROWS = [
    {"prompt": [{"role": "user", "content": "What is 7 * 2?"}],
     "chosen": [{"role": "assistant", "content": "14"}],
     "rejected": [{"role": "assistant", "content": "It is always a good idea to check. I think it is 15."}]},
    {"prompt": [{"role": "user", "content": "Name an animal that is quick and brown."}],
     "chosen": [{"role": "assistant", "content": "The quick brown fox."}],
     "rejected": [{"role": "assistant", "content": "A lazy dog."}], "margin": 1.5},
    {"prompt": "Human: hi Assistant:", "chosen": " hello there, friend", "rejected": " go away", "margin": 0.25},
]


def _pairs(tok, rows=PAIR_ROWS, max_length=256):
    report = DataReport("t")
    pairs = load_pairs([Row(r, f"mem:{i}") for i, r in enumerate(rows)], tok, DataConfig(train="x", max_length=max_length),
                       None, report)
    assert len(pairs) == len(rows), report.format()
    return pairs


# ---------------------------------------------------------------------------
# Losses by hand
# ---------------------------------------------------------------------------


def test_bradley_terry_and_reward_loss_by_hand():
    # float64 so that atol 1e-7 tests the formula, not fp32 rounding (one fp32 ulp at 1.3 is 1.2e-7).
    chosen = torch.tensor([2.0, 0.0], dtype=D)
    rejected = torch.tensor([1.0, 1.0], dtype=D)
    margin = torch.tensor([0.5, 0.0], dtype=D)
    # -log sigmoid(d) = log(1 + exp(-d))
    bt_plain = [math.log(1 + math.exp(-(2.0 - 1.0))), math.log(1 + math.exp(-(0.0 - 1.0)))]
    bt_margin = [math.log(1 + math.exp(-(2.0 - 1.0 - 0.5))), math.log(1 + math.exp(-(0.0 - 1.0 - 0.0)))]
    center = [0.01 * (2.0 + 1.0) ** 2, 0.01 * (0.0 + 1.0) ** 2]

    got = bradley_terry_loss(chosen, rejected)
    assert got.shape == (2,)
    torch.testing.assert_close(got, torch.tensor(bt_plain, dtype=D), atol=1e-7, rtol=0)
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected, margin), torch.tensor(bt_margin, dtype=D), atol=1e-7, rtol=0)
    torch.testing.assert_close(centering_penalty(chosen, rejected, 0.01), torch.tensor(center, dtype=D), atol=1e-7, rtol=0)

    total = reward_loss(chosen, rejected, margin, center_coef=0.01)
    expected = [b + c for b, c in zip(bt_margin, center)]
    torch.testing.assert_close(total, torch.tensor(expected, dtype=D), atol=1e-7, rtol=0)
    assert abs(float(total.mean()) - sum(expected) / 2) < 1e-7
    # The same in fp32, within fp32 rounding.
    total32 = reward_loss(chosen.float(), rejected.float(), margin.float(), center_coef=0.01)
    assert total32.dtype == torch.float32
    torch.testing.assert_close(total32.double(), torch.tensor(expected, dtype=D), atol=1e-6, rtol=0)
    # No centring, no margin: exactly BT.
    torch.testing.assert_close(reward_loss(chosen, rejected), torch.tensor(bt_plain, dtype=D), atol=1e-7, rtol=0)
    # Equal rewards, no margin: ln 2 per pair.
    torch.testing.assert_close(reward_loss(torch.zeros(3, dtype=D), torch.zeros(3, dtype=D)), torch.full((3,), math.log(2.0), dtype=D), atol=1e-7, rtol=0)


def test_bradley_terry_is_stable_for_large_gaps():
    chosen = torch.tensor([100.0, -100.0])
    rejected = torch.tensor([0.0, 0.0])
    got = bradley_terry_loss(chosen, rejected)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, torch.tensor([math.exp(-100.0), 100.0]), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------
# Agreement with TRL's RewardTrainer
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("with_margin", [False, True], ids=["no_margin", "margin"])
def test_reward_loss_matches_trl_reward_trainer(tmp_path, tiny_path, with_margin):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    tok = load_tokenizer(tiny_path)
    model = _tiny_reward(tiny_path, tok, seed=1)
    assert tok.pad_token_id != tok.eos_token_id
    pairs = _pairs(tok)
    batch = collate_pairs(pairs, tok.pad_token_id)
    assert (batch["attention_mask"] == 0).any(), "the batch must contain right padding"

    args = RewardConfig(output_dir=str(tmp_path / "trl"), report_to="none", center_rewards_coefficient=0.01,
                        per_device_train_batch_size=2, use_cpu=True, bf16=False, save_strategy="no", logging_strategy="no",
                        dataset_num_proc=None)
    dataset = Dataset.from_dict({"chosen_ids": [pairs[0].sequence("chosen")],
                                 "rejected_ids": [pairs[0].sequence("rejected")]})
    trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)
    assert trainer.model.config.pad_token_id == tok.pad_token_id
    model.eval()

    margin = torch.tensor([0.75, 1.5, 0.25])
    inputs = {"input_ids": batch["input_ids"].clone(), "attention_mask": batch["attention_mask"].clone()}
    if with_margin:
        inputs["margin"] = margin.clone()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, inputs)
        rewards = sequence_rewards(model, batch["input_ids"], batch["attention_mask"])
    half = rewards.shape[0] // 2
    ours = reward_loss(rewards[:half], rewards[half:], margin if with_margin else None, center_coef=0.01).mean()
    assert abs(float(ours) - float(trl_loss)) <= 1e-5, (float(ours), float(trl_loss))
    # The comparison is informative: rewards differ across pairs and the centring term matters.
    assert float(((rewards[:half] + rewards[half:]) ** 2).mean()) * 0.01 > 1e-4
    unc = reward_loss(rewards[:half], rewards[half:], margin if with_margin else None).mean()
    assert abs(float(unc) - float(trl_loss)) > 1e-4


# ---------------------------------------------------------------------------
# Score position: FAILURES rows 8 and 9
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_path():
    return resolve_model_path("smollm2-135m")


def test_score_position_with_pad_equal_eos_failures_8(smol_path):
    tok = load_tokenizer(smol_path)
    assert tok.pad_token_id == tok.eos_token_id, "this test needs the pad == eos tokenizer"
    eos = tok.eos_token_id
    prompt = [{"role": "user", "content": "How do I boil an egg?"}]
    rows = [{"prompt": prompt,
             "chosen": [{"role": "assistant", "content": "Put it in boiling water for eight minutes."}],
             "rejected": [{"role": "assistant", "content": "No."}]}]
    pairs = _pairs(tok, rows)
    p = pairs[0]
    batch = collate_pairs(pairs, tok.pad_token_id)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    # The prompt (system + user turns) already contains EOS: a pad-id search would stop there.
    assert eos in p.prompt_ids
    index = last_token_index(mask)
    expected = [len(p.prompt_ids) + len(p.chosen_ids) - 1, len(p.prompt_ids) + len(p.rejected_ids) - 1]
    assert index.tolist() == expected
    for row in range(2):
        assert ids[row, expected[row]].item() == eos          # the final <|im_end|> of the response
        response = p.chosen_ids if row == 0 else p.rejected_ids
        assert response[-1] == eos and response.count(eos) == 1
    # Shorter rejected row is right-padded with pad == eos: the padding is eos too, yet not read.
    assert ids[1, expected[1] + 1 :].eq(eos).all() and expected[1] + 1 < ids.shape[1]

    torch.manual_seed(0)
    # The real SmolLM2 weights, cut to 4 of 30 decoder layers: the score position depends only on the
    # tokenizer, template and mask, and this keeps the test to seconds on a shared CPU.
    model = load_model(smol_path, "reward", num_hidden_layers=4).eval()
    with torch.no_grad():
        scores = sequence_rewards(model, ids, mask)
        alone = [sequence_rewards(model, torch.tensor([p.sequence(w)]), torch.ones(1, len(p.sequence(w)), dtype=torch.long))
                 for w in ("chosen", "rejected")]
    assert torch.isfinite(scores).all()
    assert abs(float(scores[0] - scores[1])) > 1e-4, scores
    # FAILURES 8, second part: the padded short sample scores as it does alone.
    torch.testing.assert_close(scores, torch.cat(alone), atol=1e-4, rtol=0)

    # With a distinct pad (what export does), plain transformers pooling reads the same position.
    ensure_distinct_pad(tok, model)
    assert tok.pad_token_id != eos and model.config.pad_token_id == tok.pad_token_id
    batch2 = collate_pairs(pairs, tok.pad_token_id)
    with torch.no_grad():
        hf = model(input_ids=batch2["input_ids"], attention_mask=batch2["attention_mask"]).logits.squeeze(-1)
        ours2 = sequence_rewards(model, batch2["input_ids"], batch2["attention_mask"])
    torch.testing.assert_close(ours2, scores, atol=1e-4, rtol=0)
    torch.testing.assert_close(hf, ours2, atol=1e-4, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_score_is_padding_invariant_failures_9(tiny_path, tiny_tok, attn):
    tok = tiny_tok
    model = load_model(tiny_path, "reward", attn_implementation=attn).eval()
    ensure_distinct_pad(tok, model)
    with torch.no_grad():
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=torch.Generator().manual_seed(2)))
    pad = tok.pad_token_id
    short = tok.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"},
                                     {"role": "assistant", "content": "7"}], tokenize=False)
    long = tok.apply_chat_template([{"role": "user", "content": "Name an animal that is quick and brown, please."},
                                    {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."}],
                                   tokenize=False)
    a = tok(short, add_special_tokens=False).input_ids
    b = tok(long, add_special_tokens=False).input_ids
    n, width = len(a), len(b)
    assert width >= n + 5

    with torch.no_grad():
        alone = sequence_rewards(model, torch.tensor([a]), torch.ones(1, n, dtype=torch.long))
        right_ids = torch.full((2, width), pad, dtype=torch.long)
        right_mask = torch.zeros(2, width, dtype=torch.long)
        right_ids[0, :n], right_mask[0, :n] = torch.tensor(a), 1
        right_ids[1], right_mask[1] = torch.tensor(b), 1
        right = sequence_rewards(model, right_ids, right_mask)
        left_ids = torch.full((2, width), pad, dtype=torch.long)
        left_mask = torch.zeros(2, width, dtype=torch.long)
        left_ids[0, width - n :], left_mask[0, width - n :] = torch.tensor(a), 1
        left_ids[1], left_mask[1] = torch.tensor(b), 1
        left = sequence_rewards(model, left_ids, left_mask)
        long_alone = sequence_rewards(model, torch.tensor([b]), torch.ones(1, width, dtype=torch.long))

    assert last_token_index(right_mask).tolist() == [n - 1, width - 1]
    assert last_token_index(left_mask).tolist() == [width - 1, width - 1]
    assert torch.isfinite(right).all() and torch.isfinite(left).all()
    torch.testing.assert_close(right[0], alone[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(left[0], alone[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(right[1], long_alone[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(left[1], long_alone[0], atol=1e-4, rtol=0)
    # The scores differ between the two sequences (so equality above is not trivial).
    assert abs(float(alone[0] - long_alone[0])) > 1e-3


def test_lora_reward_model_scores_with_trained_head(tiny_path, tiny_tok):
    """LoRA (task SEQ_CLS) wraps the head in modules_to_save: scores must use the adapter's copy."""
    from alignment.core.config import LoraConfig
    from alignment.core.models import apply_lora

    tok = tiny_tok
    model = _tiny_reward(tiny_path, tok, seed=4)
    peft_model = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
                            task_type="SEQ_CLS").eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or ("score" in name and p.requires_grad):
                p.add_(0.5 * torch.randn(p.shape, generator=gen))
    batch = collate_pairs(_pairs(tok), tok.pad_token_id)
    with torch.no_grad():
        ours = sequence_rewards(peft_model, batch["input_ids"], batch["attention_mask"])
        hf = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
        with peft_model.disable_adapter():
            base = sequence_rewards(peft_model, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(ours, hf, atol=1e-5, rtol=0)
    assert (ours - base).abs().max() > 1e-3


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------


def test_expected_calibration_error_by_hand():
    margins = [0.0, 0.1, -0.1, 3.0, 2.9, 40.0]
    # confidence max(p, 1-p) and correctness (p > 0.5), with 10 equal bins on [0.5, 1]:
    # bin 0 [0.50, 0.55): 0.0 (conf .5, wrong), 0.1 (conf .525, right), -0.1 (conf .525, wrong)
    # bin 8 [0.90, 0.95): 2.9 (conf .9478, right)
    # bin 9 [0.95, 1.00]: 3.0 (conf .9526, right), 40.0 (conf 1.0 in double, right; closed right edge)
    c = {m: max(_sig(m), 1 - _sig(m)) for m in margins}
    assert c[40.0] == 1.0
    n = len(margins)
    ece = (3 / n) * abs(1 / 3 - (c[0.0] + c[0.1] + c[-0.1]) / 3)
    ece += (1 / n) * abs(1.0 - c[2.9])
    ece += (2 / n) * abs(1.0 - (c[3.0] + c[40.0]) / 2)
    got = expected_calibration_error(torch.tensor(margins, dtype=torch.float64))
    assert abs(got - ece) < 1e-9, (got, ece)
    # A single very confident correct pair is almost perfectly calibrated; a confident wrong one is not.
    assert expected_calibration_error(torch.tensor([40.0], dtype=torch.float64)) < 1e-12
    assert abs(expected_calibration_error(torch.tensor([-3.0], dtype=torch.float64)) - c[3.0]) < 1e-9


def test_pearson_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    y = torch.tensor([2.0, 4.0, 5.0, 9.0])
    # dx = [-1.5, -.5, .5, 1.5], dy = [-3, -1, 0, 4]: sum dx dy = 11, sum dx^2 = 5, sum dy^2 = 26
    assert abs(pearson(x, y) - 11 / math.sqrt(5 * 26)) < 1e-12
    assert abs(pearson(x, -y) + 11 / math.sqrt(5 * 26)) < 1e-12
    assert abs(pearson(x, 3 * x + 1) - 1.0) < 1e-12
    assert pearson(x, torch.full((4,), 7.0)) == 0.0


def test_reward_report_keys_and_values():
    chosen = torch.tensor([1.0, 0.5, -1.0], dtype=torch.float64)
    rejected = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    lc = torch.tensor([3, 5, 7])
    lr = torch.tensor([2, 4, 6])
    report = reward_report(chosen, rejected, lc, lr)
    assert set(report) == {"eval/accuracy", "eval/margin", "eval/ece", "eval/length_corr", "eval/reward_mean",
                           "eval/reward_std", "eval/pairs"}
    assert all(isinstance(v, float) for v in report.values())
    # The tie counts as wrong. (The fraction is averaged in fp32, hence 1e-7.)
    assert report["eval/accuracy"] == pytest.approx(1 / 3, abs=1e-7)
    assert pairwise_accuracy(chosen, rejected) == pytest.approx(1 / 3, abs=1e-7)
    assert report["eval/margin"] == pytest.approx((1.0 + 0.0 - 2.0) / 3, abs=1e-12)
    assert report["eval/pairs"] == 3.0
    rewards = [1.0, 0.5, -1.0, 0.0, 0.5, 1.0]
    mean = sum(rewards) / 6
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / 5)  # unbiased, as torch.std
    assert report["eval/reward_mean"] == pytest.approx(mean, abs=1e-12)
    assert report["eval/reward_std"] == pytest.approx(std, abs=1e-12)
    assert report["eval/ece"] == pytest.approx(expected_calibration_error(chosen - rejected), abs=1e-12)
    assert report["eval/length_corr"] == pytest.approx(
        pearson(torch.tensor(rewards), torch.tensor([3.0, 5, 7, 2, 4, 6])), abs=1e-12)


# ---------------------------------------------------------------------------
# RewardScorer
# ---------------------------------------------------------------------------


def test_reward_scorer_normalize_needs_stats(tmp_path, tiny_path):
    tok = load_tokenizer(tiny_path)
    model = _tiny_reward(tiny_path, tok, seed=3)
    out = tmp_path / "rm"
    model.save_pretrained(out)
    tok.save_pretrained(out)

    with pytest.raises(ValueError) as info:
        RewardScorer(out, normalize=True)
    message = str(info.value)
    assert "reward_mean" in message and "reward_std" in message

    # Without normalisation the same directory scores, and the scores equal the live model's.
    scorer = RewardScorer(out)
    seqs = [[5, 6, 7, 8], [9, 10]]
    got = scorer.score_ids(seqs)
    with torch.no_grad():
        live = torch.cat([sequence_rewards(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in seqs])
    torch.testing.assert_close(got, live, atol=1e-5, rtol=0)

    # With stats in the config, normalisation is (r - mean) / std.
    model.config.reward_mean, model.config.reward_std = 0.5, 2.0
    model.save_pretrained(out)
    normed = RewardScorer(out, normalize=True).score_ids(seqs)
    torch.testing.assert_close(normed, (live - 0.5) / 2.0, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------
# Packed layouts score exactly like right-padded rows
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", ["packed", "shared_prompt"])
def test_packed_rewards_and_gradients_equal_padded(tiny_path, tiny_tok, attn, layout):
    """Separate packing and shared-prompt packing give the padded rewards (fp32, 1e-5) and the same
    gradient of the Bradley-Terry loss; pack_to 24 forces several rows and segments over capacity."""
    tok = tiny_tok
    model = load_model(tiny_path, "reward", attn_implementation=attn)  # train mode: dropout is 0 in the tiny config
    ensure_distinct_pad(tok, model)
    with torch.no_grad():
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=torch.Generator().manual_seed(3)))
    pairs = _pairs(tok)
    padded = collate_pairs(pairs, tok.pad_token_id)
    packed = collate_pairs(pairs, tok.pad_token_id, pack_to=24, share_prompt=layout == "shared_prompt")
    assert packed["input_ids"].shape[0] >= 2
    if layout == "shared_prompt":  # each prompt runs once
        prompts = sum(len(p.prompt_ids) for p in pairs)
        assert packed["attention_mask"].sum() == padded["attention_mask"].sum() - prompts

    def rewards_and_grads(batch):
        model.zero_grad(set_to_none=True)
        rewards = batch_rewards(model, batch)
        half = rewards.shape[0] // 2
        reward_loss(rewards[:half], rewards[half:], batch["margin"], 0.01).sum().backward()
        return rewards.detach(), [p.grad.clone() for p in model.parameters()]

    r_pad, g_pad = rewards_and_grads(padded)
    r_pack, g_pack = rewards_and_grads(packed)
    torch.testing.assert_close(r_pack, r_pad, atol=1e-5, rtol=0)
    assert r_pad.std() > 0.1  # rewards differ between sequences: a wrong read position would show
    for a, b in zip(g_pack, g_pad):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert sum(g.abs().sum() for g in g_pad) > 0


def test_align_score_cli_pairs_single_responses_and_skips(tmp_path, tiny_path):
    """`align score`: every input row gets a record in input order; pairs get both rewards and the margin,
    single responses one reward, unusable pairs a reason; batching does not change a score."""
    import json

    from alignment import cli
    from reward.scorer import sequence_ids

    tok = load_tokenizer(tiny_path)
    model = _tiny_reward(tiny_path, tok, seed=5)
    rm_dir = tmp_path / "rm"
    model.save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    rows = [
        PAIR_ROWS[0],
        {"prompt": "Q: 2 + 2 =", "response": " 4"},
        {"prompt": "same", "chosen": " x", "rejected": " x"},  # identical responses: skipped, with the reason
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        PAIR_ROWS[1],
    ]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scores.jsonl"
    assert cli.main(["score", "--model", str(rm_dir), "--data", str(data), "--out", str(out), "--batch-size", "2"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["origin"] for r in records] == [f"{data}:{i}" for i in range(1, 6)]
    assert set(records[0]) == {"origin", "reward_chosen", "reward_rejected", "margin"}
    assert records[0]["margin"] == pytest.approx(records[0]["reward_chosen"] - records[0]["reward_rejected"])
    assert set(records[1]) == {"origin", "reward"} and set(records[3]) == {"origin", "reward"}
    assert records[2] == {"origin": f"{data}:3", "skipped": "chosen identical to rejected"}

    scorer = RewardScorer(rm_dir)
    alone = scorer.score_ids([sequence_ids(tok, "Q: 2 + 2 =", " 4", 512)])  # scored alone, not in a batch of 2
    assert records[1]["reward"] == pytest.approx(alone.item(), abs=1e-5)
