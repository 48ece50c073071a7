"""Unit tests for DPO and its family: each loss by hand, agreement with TRL's DPOTrainer, the step-0
guard, the three reference modes (FAILURES rows 22), recipe cross-checks and cache fingerprints.

fp32 on CPU with the tiny random Llama.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from alignment.core.config import DataConfig, LoraConfig, RecipeError
from alignment.core.recipes import load_recipe
from alignment.data.layout import IGNORE
from alignment.data.report import DataReport
from alignment.data.sources import Row
from alignment.core.recipes import DPOConfig, validate_dpo
from alignment.stages.dpo import (Reference, compute_reference_table, make_loss_fn, pair_batch, pair_logps, pairs_fingerprint, preference_losses)
from alignment.core.fingerprint import model_fingerprint
from alignment.rlhf.dpo_losses import dpo_logits, dpo_sigmoid_loss, hinge_loss, implicit_rewards, ipo_loss, simpo_loss
from alignment.core.models import apply_lora, load_model, load_tokenizer, resolve_model_path
from alignment.data.layout import collate_pairs
from alignment.data.preference import TokenizedPair, load_pairs

LN2 = math.log(2.0)
D = torch.float64


def _ls(x: float) -> float:
    """log sigmoid(x), by hand."""
    return -math.log(1.0 + math.exp(-x))


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_path():
    return resolve_model_path("tiny-llama")


@pytest.fixture(scope="module")
def tok(tiny_path):
    return load_tokenizer(tiny_path)


PAIR_ROWS = [
    {"prompt": [{"role": "user", "content": "What is 7 * 2?"}],
     "chosen": [{"role": "assistant", "content": "14"}],
     "rejected": [{"role": "assistant", "content": "It is always a good idea to check. I think it is 15."}]},
    {"prompt": [{"role": "user", "content": "Name an animal that is quick and brown."}],
     "chosen": [{"role": "assistant", "content": "The quick brown fox."}],
     "rejected": [{"role": "assistant", "content": "A lazy dog."}]},
    {"prompt": [{"role": "user", "content": "hi"}],
     "chosen": [{"role": "assistant", "content": "hello there, friend"}],
     "rejected": [{"role": "assistant", "content": "go away"}]},
]


@pytest.fixture(scope="module")
def pairs(tok):
    report = DataReport("t")
    rows = [Row(r, f"mem:{i}") for i, r in enumerate(PAIR_ROWS)]
    out = load_pairs(rows, tok, DataConfig(train="x", max_length=256), None, report)
    assert len(out) == len(PAIR_ROWS), report.format()
    return out


def _perturb(module: torch.nn.Module, seed: int, scale: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def _policy_and_frozen(tiny_path, seed: int = 0, scale: float = 0.05):
    """(perturbed policy, frozen initial copy): policy != reference."""
    frozen = load_model(tiny_path).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    policy = copy.deepcopy(frozen)
    for p in policy.parameters():
        p.requires_grad_(True)
    _perturb(policy.model.layers[0].mlp, seed, scale)
    return policy, frozen


# ---------------------------------------------------------------------------
# Losses by hand (2 pairs, float64 so atol 1e-7 checks the formula)
# ---------------------------------------------------------------------------

PC, PR, RC, RR = [-10.0, -20.0], [-12.0, -15.0], [-11.0, -18.0], [-11.5, -16.0]
LC, LR = [4.0, 8.0], [6.0, 5.0]
# h = (pc - rc) - (pr - rr): pair 0: 1 - (-0.5) = 1.5; pair 1: -2 - 1 = -3
H = [1.5, -3.0]


def _t(values):
    return torch.tensor(values, dtype=D)


def test_dpo_logits_by_hand():
    torch.testing.assert_close(dpo_logits(_t(PC), _t(PR), _t(RC), _t(RR)), _t(H), atol=1e-12, rtol=0)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_sigmoid_loss_by_hand(beta):
    expected = [-_ls(beta * h) for h in H]
    got = dpo_sigmoid_loss(_t(PC), _t(PR), _t(RC), _t(RR), beta)
    torch.testing.assert_close(got, _t(expected), atol=1e-7, rtol=0)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_cdpo_label_smoothing_by_hand(beta):
    eps = 0.1
    expected = [-(1 - eps) * _ls(beta * h) - eps * _ls(-beta * h) for h in H]
    got = dpo_sigmoid_loss(_t(PC), _t(PR), _t(RC), _t(RR), beta, label_smoothing=eps)
    torch.testing.assert_close(got, _t(expected), atol=1e-7, rtol=0)
    # Smoothing changes the loss (the test above is not the plain sigmoid loss).
    assert (got - dpo_sigmoid_loss(_t(PC), _t(PR), _t(RC), _t(RR), beta)).abs().min() > 1e-3


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_loss_by_hand(beta):
    # per-token log-ratios: pair 0: 1/4 - (-0.5)/6; pair 1: -2/8 - 1/5; loss = (h_avg - 1/(2 beta))^2
    h_avg = [(PC[i] - RC[i]) / LC[i] - (PR[i] - RR[i]) / LR[i] for i in range(2)]
    assert h_avg[0] == pytest.approx(0.25 + 0.5 / 6) and h_avg[1] == pytest.approx(-0.25 - 0.2)
    expected = [(h - 1 / (2 * beta)) ** 2 for h in h_avg]
    got = ipo_loss(_t(PC), _t(PR), _t(RC), _t(RR), beta, _t(LC), _t(LR))
    torch.testing.assert_close(got, _t(expected), atol=1e-7, rtol=0)
    # A zero-length response is clamped to 1 token, never a division by zero.
    z = ipo_loss(_t(PC), _t(PR), _t(RC), _t(RR), beta, _t([0.0, 8.0]), _t(LR))
    assert torch.isfinite(z).all()
    assert float(z[0]) == pytest.approx(((PC[0] - RC[0]) / 1 - (PR[0] - RR[0]) / LR[0] - 1 / (2 * beta)) ** 2, abs=1e-7)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_hinge_loss_by_hand(beta):
    expected = [max(0.0, 1 - beta * h) for h in H]  # beta 1: [0, 4] (pair 0 clamps); beta 0.1: [0.85, 1.3]
    got = hinge_loss(_t(PC), _t(PR), _t(RC), _t(RR), beta)
    torch.testing.assert_close(got, _t(expected), atol=1e-7, rtol=0)


@pytest.mark.parametrize("beta", [2.0, 0.1])
def test_simpo_loss_by_hand(beta):
    gamma = 0.5
    # beta * (pc/lc - pr/lr): pair 0: beta * (-2.5 + 2); pair 1: beta * (-2.5 + 3)
    margins = [beta * (PC[i] / LC[i] - PR[i] / LR[i]) for i in range(2)]
    expected = [-_ls(m - gamma) for m in margins]
    got = simpo_loss(_t(PC), _t(PR), _t(LC), _t(LR), beta, gamma)
    torch.testing.assert_close(got, _t(expected), atol=1e-7, rtol=0)
    # Reference-free: no reference argument exists; and a zero length is clamped (finite, FAILURES 13).
    assert torch.isfinite(simpo_loss(_t(PC), _t(PR), _t([0.0, 0.0]), _t(LR), beta, gamma)).all()


def test_implicit_rewards_by_hand():
    beta = 0.1
    chosen, rejected = implicit_rewards(_t(PC), _t(PR), _t(RC), _t(RR), beta)
    torch.testing.assert_close(chosen, _t([beta * (PC[i] - RC[i]) for i in range(2)]), atol=1e-7, rtol=0)
    torch.testing.assert_close(rejected, _t([beta * (PR[i] - RR[i]) for i in range(2)]), atol=1e-7, rtol=0)
    # The sigmoid loss is -log sigmoid(reward margin).
    torch.testing.assert_close(dpo_sigmoid_loss(_t(PC), _t(PR), _t(RC), _t(RR), beta),
                               -torch.nn.functional.logsigmoid(chosen - rejected), atol=1e-12, rtol=0)


def test_preference_losses_dispatch_and_rpo_term(monkeypatch):
    args = [_t(PC), _t(PR), _t(RC), _t(RR), _t(LC), _t(LR)]
    for loss, expected in [
        ("sigmoid", dpo_sigmoid_loss(*args[:4], 0.1)),
        ("ipo", ipo_loss(*args[:4], 0.1, *args[4:])),
        ("hinge", hinge_loss(*args[:4], 0.1)),
        ("simpo", simpo_loss(args[0], args[1], *args[4:], 0.1, 0.5)),
    ]:
        torch.testing.assert_close(preference_losses(DPOConfig(loss=loss, beta=0.1), *args), expected, atol=0, rtol=0)
    got = preference_losses(DPOConfig(loss="sigmoid", beta=0.1, label_smoothing=0.1), *args)
    torch.testing.assert_close(got, dpo_sigmoid_loss(*args[:4], 0.1, 0.1), atol=0, rtol=0)

    # make_loss_fn: sum of per-pair losses + alpha * chosen NLL * rpo_scale; rewards for metrics.
    class FakeRef:
        def logps(self, policy, batch):
            return _t(RC), _t(RR)

    import alignment.stages.dpo as dpo_mod

    monkeypatch.setattr(dpo_mod, "pair_logps", lambda model, batch: (_t(PC), _t(PR), _t(LC), _t(LR)))
    scale = 2 / (LC[0] + LC[1])
    fn = make_loss_fn(DPOConfig(loss="sigmoid", beta=0.1, rpo_alpha=0.5), FakeRef())
    loss, stats = fn(None, {"attention_mask": torch.ones(4, 3), "rpo_scale": scale})
    sig = [-_ls(0.1 * h) for h in H]
    expected = sum(sig) + 0.5 * (-(PC[0] + PC[1])) * scale
    assert float(loss) == pytest.approx(expected, abs=1e-7)
    assert stats["pref_loss"] == pytest.approx(sum(sig), abs=1e-7)
    assert stats["reward_chosen"] == pytest.approx(0.1 * ((PC[0] - RC[0]) + (PC[1] - RC[1])), abs=1e-7)
    assert stats["correct"] == 1.0  # pair 0 has h > 0, pair 1 h < 0


# ---------------------------------------------------------------------------
# Agreement with TRL's DPOTrainer
# ---------------------------------------------------------------------------


TRL_CASES = {
    # id: (TRL loss_type, TRL loss_weights, our DPOConfig kwargs)
    "sigmoid": (["sigmoid"], None, dict(loss="sigmoid")),
    "ipo": (["ipo"], None, dict(loss="ipo")),
    "hinge": (["hinge"], None, dict(loss="hinge")),
    "rpo": (["sigmoid", "sft"], [1.0, 0.5], dict(loss="sigmoid", rpo_alpha=0.5)),
}


@pytest.mark.parametrize("case", list(TRL_CASES))
def test_loss_matches_trl_dpo_trainer(tmp_path, tiny_path, tok, pairs, case):
    from datasets import Dataset
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    loss_type, weights, ours_kwargs = TRL_CASES[case]
    frozen = load_model(tiny_path).eval()
    policy = load_model(tiny_path).eval()
    args = TRLDPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", beta=0.1, loss_type=loss_type,
                        loss_weights=weights, max_length=4096, use_cpu=True, bf16=False, save_strategy="no",
                        logging_strategy="no", per_device_train_batch_size=2)
    # bf16=False: TRL's default (bf16 unless fp16) would run the prepared reference under bf16 autocast.
    dataset = Dataset.from_dict({"prompt": ["hi"], "chosen": [" there"], "rejected": [" go"]})
    trainer = DPOTrainer(model=policy, ref_model=frozen, args=args, train_dataset=dataset, processing_class=tok)
    _perturb(policy.model.layers[0].mlp, seed=7, scale=0.05)  # after construction (it reseeds): policy != ref
    policy.eval()

    batch = pair_batch(pairs, list(range(len(pairs))), tok.pad_token_id, "cpu")
    completion_mask = (batch["labels"] != IGNORE).long()
    # Our labels mark exactly the response tokens, so TRL's labels (ids where completion_mask) equal ours.
    assert torch.equal(batch["input_ids"].masked_fill(completion_mask == 0, IGNORE), batch["labels"])
    inputs = {"input_ids": batch["input_ids"].clone(), "attention_mask": batch["attention_mask"].clone(),
              "completion_mask": completion_mask}
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(policy, inputs))

        cfg = DPOConfig(beta=0.1, **ours_kwargs)
        reference = Reference("model", frozen=frozen)
        pc, pr, lc, lr = pair_logps(policy, batch)
        n_pairs = pc.shape[0]
        scale = n_pairs / float(lc.sum())  # per-pair sum -> TRL's token-mean NLL over the batch
        loss_sum, stats = make_loss_fn(cfg, reference)(policy, dict(batch, rpo_scale=scale))
    ours = float(loss_sum) / n_pairs
    assert abs(ours - trl_loss) <= 1e-5, (case, ours, trl_loss)
    # Informative: the policy differs from the reference, so the loss is not its step-0 value.
    rc, rr = reference.logps(policy, batch)
    assert (pc - rc).abs().max() > 1e-3
    if case == "sigmoid":
        assert abs(ours - LN2) > 1e-4
    # TRL's reward metrics agree with ours too.
    trl_margin = trainer._metrics["eval"]["rewards/margins"][-1]
    assert trl_margin == pytest.approx((stats["reward_chosen"] - stats["reward_rejected"]) / n_pairs, abs=1e-5)


# ---------------------------------------------------------------------------
# Step-0 guard and reference modes
# ---------------------------------------------------------------------------


def test_step0_reference_equals_policy_gives_ln2(tiny_path, tok, pairs):
    policy = load_model(tiny_path).eval()
    frozen = copy.deepcopy(policy)
    batch = pair_batch(pairs, [0, 1, 2], tok.pad_token_id, "cpu")
    with torch.no_grad():
        pc, pr, lc, lr = pair_logps(policy, batch)
        rc, rr = Reference("model", frozen=frozen).logps(policy, batch)
    assert (pc < 0).all() and (pr < 0).all()
    loss = dpo_sigmoid_loss(pc, pr, rc, rr, 0.1)
    torch.testing.assert_close(loss, torch.full_like(loss, LN2), atol=1e-6, rtol=0)
    reward_c, reward_r = implicit_rewards(pc, pr, rc, rr, 0.1)
    assert reward_c.abs().max() <= 1e-6 and reward_r.abs().max() <= 1e-6
    # Token counts equal the response lengths.
    assert lc.tolist() == [float(len(p.chosen_ids)) for p in pairs]
    assert lr.tolist() == [float(len(p.rejected_ids)) for p in pairs]


class _Wrapped(torch.nn.Module):
    """What Reference("adapter") sees under DeepSpeed: the peft model at `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def test_three_reference_modes_agree(tiny_path, tok, pairs):
    base = load_model(tiny_path).eval()
    frozen = copy.deepcopy(base)
    for p in frozen.parameters():
        p.requires_grad_(False)
    peft_model = apply_lora(base, LoraConfig(enabled=True, r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    peft_model.eval()
    policy = _Wrapped(peft_model)
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and all(float(p.detach().abs().max()) == 0.0 for p in lora_b), "peft initialises lora_B to zero"

    pad = tok.pad_token_id
    everything = pair_batch(pairs, [0, 1, 2], pad, "cpu")
    with torch.no_grad():
        # Before perturbing: the LoRA policy equals its base exactly.
        pc0, pr0, _, _ = pair_logps(policy, everything)
        fc, fr, _, _ = pair_logps(frozen, everything)
        torch.testing.assert_close(pc0, fc, atol=1e-6, rtol=0)
        table = {"train": torch.stack([fc, fr], dim=1)}
    _perturb(torch.nn.ParameterList(lora_b), seed=3, scale=0.2)

    modes = {
        "model": Reference("model", frozen=frozen),
        "precomputed": Reference("precomputed", table=table),
        "adapter": Reference("adapter"),
    }
    with torch.no_grad():
        pc, pr, lc, lr = pair_logps(policy, everything)
        assert (pc - fc).abs().max() > 1e-3, "the perturbed adapter must change the policy"
        got = {name: ref.logps(policy, everything) for name, ref in modes.items()}
        for name, (rc, rr) in got.items():
            torch.testing.assert_close(rc, fc, atol=1e-6, rtol=0, msg=f"{name} chosen")
            torch.testing.assert_close(rr, fr, atol=1e-6, rtol=0, msg=f"{name} rejected")
        losses = {name: dpo_sigmoid_loss(pc, pr, rc, rr, 0.1) for name, (rc, rr) in got.items()}
        for name in ("precomputed", "adapter"):
            torch.testing.assert_close(losses[name], losses["model"], atol=1e-6, rtol=0)
        assert (losses["model"] - LN2).abs().max() > 1e-4
        # The adapter is re-enabled after the reference pass.
        pc_again, _, _, _ = pair_logps(policy, everything)
        torch.testing.assert_close(pc_again, pc, atol=0, rtol=0)

        # A sub-batch in another order reads the right rows of the table (by batch["index"]).
        sub = pair_batch(pairs, [2, 0], pad, "cpu")
        rc_pre, rr_pre = modes["precomputed"].logps(policy, sub)
        torch.testing.assert_close(rc_pre, fc[[2, 0]], atol=0, rtol=0)
        torch.testing.assert_close(rr_pre, fr[[2, 0]], atol=0, rtol=0)
        for name in ("model", "adapter"):
            rc_s, rr_s = modes[name].logps(policy, sub)
            torch.testing.assert_close(rc_s, rc_pre, atol=1e-4, rtol=1e-6)
            torch.testing.assert_close(rr_s, rr_pre, atol=1e-4, rtol=1e-6)
        # The eval split reads the eval table.
        table["eval"] = table["train"][[1, 2, 0]] - 1.0
        ev = pair_batch(pairs, [0], pad, "cpu", split="eval")
        rc_ev, rr_ev = modes["precomputed"].logps(policy, ev)
        assert float(rc_ev[0]) == float(fc[1] - 1.0) and float(rr_ev[0]) == float(fr[1] - 1.0)


def test_precomputed_reference_failures_22(tiny_path, tok, pairs):
    policy, frozen = _policy_and_frozen(tiny_path, seed=11, scale=0.05)
    pad = tok.pad_token_id
    one_process = SimpleNamespace(world_size=1, rank=0, device=torch.device("cpu"), gather_objects=lambda local: [local])
    engine = SimpleNamespace(layout=SimpleNamespace(micro_batch_size=2), dist=one_process)
    with torch.no_grad():
        table = compute_reference_table(engine, frozen, pairs, pad, "train")
        assert table.shape == (len(pairs), 2) and table.dtype == torch.float32
        # Each pair through the frozen model on its own (a different batch, so different padding).
        for i, p in enumerate(pairs):
            c, r, _, _ = pair_logps(frozen, collate_pairs([p], pad))
            torch.testing.assert_close(table[i], torch.stack([c[0], r[0]]), atol=1e-4, rtol=1e-6)

    reference = Reference("precomputed", table={"train": table})
    batch = pair_batch(pairs, [0, 1, 2], pad, "cpu")
    with torch.no_grad():
        rc, rr = reference.logps(policy, batch)
        frc, frr = Reference("model", frozen=frozen).logps(policy, batch)
    torch.testing.assert_close(rc, frc, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(rr, frr, atol=1e-4, rtol=1e-6)

    cfg = DPOConfig(loss="sigmoid", beta=0.1)
    loss_sum, stats = make_loss_fn(cfg, reference)(policy, dict(batch, rpo_scale=1.0))
    step1 = float(loss_sum) / 3
    assert math.isfinite(step1) and abs(step1 - LN2) > 1e-3, step1
    assert abs(stats["reward_chosen"]) + abs(stats["reward_rejected"]) > 1e-3
    loss_model, _ = make_loss_fn(cfg, Reference("model", frozen=frozen))(policy, dict(batch, rpo_scale=1.0))
    assert float(loss_model) / 3 == pytest.approx(step1, abs=1e-5)
    # The gradient flows to the policy (the cached values are constants).
    loss_sum.backward()
    assert policy.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0

    # The reference does not follow the policy: after more changes it still returns the initial values.
    _perturb(policy, seed=12, scale=0.05)
    with torch.no_grad():
        rc2, rr2 = reference.logps(policy, batch)
    assert torch.equal(rc2, rc) and torch.equal(rr2, rr)


# ---------------------------------------------------------------------------
# Recipe cross-field checks
# ---------------------------------------------------------------------------


def _recipe(*sets):
    return load_recipe("configs/tiny/dpo.yaml", "dpo", list(sets))


def test_validate_dpo_cross_field_errors(repo, monkeypatch):
    monkeypatch.chdir(repo)
    assert validate_dpo(_recipe()) == "model"
    assert validate_dpo(_recipe("dpo.reference=auto")) == "model"
    assert validate_dpo(_recipe("dpo.reference=auto", "lora.enabled=true")) == "adapter"
    assert validate_dpo(_recipe("dpo.reference=auto", "lora.enabled=true", "dpo.reference_model=tiny-llama")) == "model"
    assert validate_dpo(_recipe("dpo.reference=precomputed")) == "precomputed"
    assert validate_dpo(_recipe("dpo.loss=simpo", "dpo.reference=auto")) == "none"
    assert validate_dpo(_recipe("dpo.label_smoothing=0.1")) == "model"

    bad = {
        ("dpo.loss=simpo", "dpo.reference=auto", "dpo.reference_model=tiny-llama"): "simpo",
        ("dpo.loss=simpo", "dpo.reference=model"): "simpo",
        ("dpo.reference=adapter",): "lora.enabled",
        ("dpo.reference=adapter", "lora.enabled=true", "dpo.reference_model=tiny-llama"): "reference_model",
        ("dpo.loss=ipo", "dpo.label_smoothing=0.1"): "label_smoothing",
        ("dpo.loss=hinge", "dpo.label_smoothing=0.1"): "label_smoothing",
        ("dpo.label_smoothing=0.5",): "label_smoothing",
        ("dpo.beta=0",): "beta",
    }
    for sets, needle in bad.items():
        with pytest.raises(RecipeError) as info:
            validate_dpo(_recipe(*sets))
        assert needle in str(info.value), (sets, str(info.value))


# ---------------------------------------------------------------------------
# Reference cache keys
# ---------------------------------------------------------------------------


def test_model_fingerprint_tracks_weights(tmp_path, tiny_path):
    model = load_model(tiny_path)
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    first = model_fingerprint(str(folder))
    assert first == model_fingerprint(str(folder))  # deterministic
    (folder / "notes.md").write_text("not a weight, config or tokenizer file")
    assert model_fingerprint(str(folder)) == first

    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight[0, 0] += 1e-3
    model.save_pretrained(folder)
    changed = model_fingerprint(str(folder))
    assert changed != first

    config = folder / "config.json"
    config.write_text(config.read_text().replace('"rms_norm_eps"', '"rms_norm_eps" ', 1))
    assert model_fingerprint(str(folder)) != changed
    # A hub id the local cache does not hold cannot be pinned to a commit (tests/core/test_hub_models.py).
    assert model_fingerprint("org/model-a") is None


def test_pairs_fingerprint_tracks_token_ids(pairs):
    first = pairs_fingerprint(pairs)
    same = [TokenizedPair(list(p.prompt_ids), list(p.chosen_ids), list(p.rejected_ids), "elsewhere") for p in pairs]
    assert pairs_fingerprint(same) == first  # origin is not part of the key; ids are
    for field in ("prompt_ids", "chosen_ids", "rejected_ids"):
        changed = copy.deepcopy(pairs)
        ids = getattr(changed[1], field)
        ids[-1] = ids[-1] + 1
        assert pairs_fingerprint(changed) != first, field
    assert pairs_fingerprint(list(reversed(pairs))) != first
    assert pairs_fingerprint(pairs[:2]) != first
    # Moving a token across the prompt/response boundary changes the key.
    p = pairs[0]
    moved = [TokenizedPair(p.prompt_ids[:-1], p.prompt_ids[-1:] + p.chosen_ids, p.prompt_ids[-1:] + p.rejected_ids, "")]
    assert pairs_fingerprint(moved) != pairs_fingerprint(pairs[:1])


def test_logp_drop_watch_compares_like_with_like():
    from alignment.stages.dpo import LogpDropWatch

    # Held-out baseline: train batches are ignored, the eval at a later step decides.
    watch = LogpDropWatch(threshold=0.5)
    watch.eval_baseline = -0.30
    assert watch.update({"logps/chosen_per_token": -3.0, "rewards/margins": 1.0}, "x") is None
    assert watch.update({"eval/logps/chosen_per_token": -0.70, "eval/rewards/margins": 1.0}, "x") is None
    assert watch.update({"eval/logps/chosen_per_token": -0.90, "eval/rewards/margins": -0.1}, "x") is None
    message = watch.update({"eval/logps/chosen_per_token": -0.90, "eval/rewards/margins": 1.0}, "rpo_alpha")
    assert message and "-0.300 to -0.900" in message and "rpo_alpha" in message
    assert watch.update({"eval/logps/chosen_per_token": -2.0, "eval/rewards/margins": 1.0}, "x") is None  # once

    # No eval split: the mean of the last 5 train batches against the first 5, so one noisy
    # batch (-2.0 at step 2) does not fire it, a sustained drop does.
    watch = LogpDropWatch(threshold=0.5, window=5)
    values = [-0.3, -2.0, -0.3, -0.3, -0.3] + [-0.4] * 5
    assert all(watch.update({"logps/chosen_per_token": v, "rewards/margins": 1.0}, "x") is None for v in values)
    fired = [watch.update({"logps/chosen_per_token": -1.5, "rewards/margins": 1.0}, "x") for _ in range(5)]
    assert fired[:3] == [None] * 3 and fired[3] and fired[4] is None


def test_evaluate_builds_no_graph(tiny_path, tok, pairs):
    """Held-out DPO evaluation runs without autograd (a regression once kept a training-sized graph per
    eval batch), and gives the same accuracy as the loss function on the same pairs."""
    from alignment.stages.dpo import evaluate

    policy, frozen = _policy_and_frozen(tiny_path)
    reference = Reference("model", frozen=frozen)
    inner = make_loss_fn(DPOConfig(beta=0.1), reference)
    grad_modes = []

    def loss_fn(model, batch):
        grad_modes.append(torch.is_grad_enabled())
        return inner(model, batch)

    dist = SimpleNamespace(world_size=1, rank=0, device="cpu", reduce_sums=lambda sums: dict(sums))
    engine = SimpleNamespace(layout=SimpleNamespace(micro_batch_size=2), dist=dist)
    out = evaluate(engine, policy, pairs, tok.pad_token_id, loss_fn)
    assert grad_modes == [False, False]  # 3 pairs in micro-batches of 2
    assert policy.training  # back in train mode afterwards
    with torch.no_grad():
        batch = pair_batch(pairs, [0, 1, 2], tok.pad_token_id, "cpu")
        pc, pr, _, _ = pair_logps(policy, batch)
        rc, rr = reference.logps(policy, batch)
    expected = ((pc - rc) > (pr - rr)).double().mean().item()
    assert out["eval/rewards/accuracies"] == pytest.approx(expected, abs=1e-12)


def test_precomputed_eval_reference_stays_the_initial_model_after_5_adam_steps(tiny_path, tok, pairs):
    """FAILURES row 22 (trl#1107): with dpo.reference=precomputed, after 5 real Adam steps on the policy the
    eval split's reference log-probs are still a fresh forward of the frozen initial model, and evaluate()'s
    reward accuracy is scored against them (a "reference" recomputed from the trained policy gives rewards 0,
    accuracy 0)."""
    from alignment.stages.dpo import evaluate

    frozen = load_model(tiny_path).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    policy = copy.deepcopy(frozen).train()  # starts as the reference: the stage's own set-up
    for p in policy.parameters():
        p.requires_grad_(True)
    pad = tok.pad_token_id
    eval_pairs = [pairs[2], pairs[0], pairs[1]]  # another order than train: reading the train table gives wrong rows
    dist = SimpleNamespace(world_size=1, rank=0, device=torch.device("cpu"), gather_objects=lambda local: [local],
                           reduce_sums=lambda sums: dict(sums))
    engine = SimpleNamespace(layout=SimpleNamespace(micro_batch_size=2), dist=dist)
    with torch.no_grad():
        table = {"train": compute_reference_table(engine, frozen, pairs, pad, "train"),
                 "eval": compute_reference_table(engine, frozen, eval_pairs, pad, "eval")}
    initial_table = {k: v.clone() for k, v in table.items()}

    used = []  # (split, chosen, rejected) for every reference lookup

    class Recorded(Reference):
        def logps(self, policy, batch):
            rc, rr = super().logps(policy, batch)
            used.append((batch["split"], rc, rr))
            return rc, rr

    loss_fn = make_loss_fn(DPOConfig(loss="sigmoid", beta=0.1), Recorded("precomputed", table=table))
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-3)
    batch = dict(pair_batch(pairs, [0, 1, 2], pad, "cpu", "train"), rpo_scale=1.0)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss_sum, _ = loss_fn(policy, batch)
        loss_sum.backward()
        optimizer.step()
        losses.append(float(loss_sum.detach()) / 3)
    assert losses[0] == pytest.approx(LN2, abs=1e-4)  # step 1: policy == reference
    assert losses[-1] < losses[0] - 1e-3, losses  # the steps really trained the policy

    used.clear()
    out = evaluate(engine, policy, eval_pairs, pad, loss_fn)
    assert [split for split, _, _ in used] == ["eval", "eval"]  # 3 pairs in micro-batches of 2
    rc_used = torch.cat([rc for _, rc, _ in used])
    rr_used = torch.cat([rr for _, _, rr in used])
    everything = pair_batch(eval_pairs, [0, 1, 2], pad, "cpu", "eval")
    with torch.no_grad():
        frc, frr, _, _ = pair_logps(frozen, everything)  # a fresh forward of the initial model
        pc, pr, _, _ = pair_logps(policy, everything)
    assert all(torch.equal(table[k], initial_table[k]) for k in table)  # training never wrote to the cache
    torch.testing.assert_close(rc_used, frc, atol=1e-4, rtol=1e-6)  # micro-batches of 2 + 1: other padding
    torch.testing.assert_close(rr_used, frr, atol=1e-4, rtol=1e-6)
    assert (pc - frc).abs().max() > 1e-2  # the policy has moved away from the reference it is scored against
    expected = ((pc - frc) > (pr - frr)).double().mean().item()
    assert expected > 0  # against the trained policy itself it would be 0
    assert out["eval/rewards/accuracies"] == pytest.approx(expected, abs=1e-12)
    margins = 0.1 * ((pc - frc) - (pr - frr))
    assert out["eval/rewards/margins"] == pytest.approx(margins.mean().item(), abs=1e-5)
