"""KTO: the loss by hand (eq. 8), equal to TRL's KTOTrainer on the same batch, and a tiny run end to end on
thumbs-up/down rows written by datasets."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import datasets
import pytest
import torch

from alignment.core.models import load_model, load_tokenizer, resolve_model_path
from alignment.data.layout import IGNORE
from alignment.data.report import DataReport
from alignment.data.sources import Row
from alignment.data.unpaired import load_answers
from alignment.rlhf.kto_losses import kto_loss, kto_reference_point
from alignment.stages.kto import kto_batch, make_loss_fn
from helpers import REPO, align_cache, read_metrics, run_cli  # noqa: F401


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_kto_loss_by_hand():
    policy = torch.tensor([-4.0, -6.0, -3.0])
    ref = torch.tensor([-5.0, -5.0, -3.5])
    desirable = torch.tensor([True, False, True])
    z0 = kto_reference_point(torch.tensor([-7.0, -9.0]), torch.tensor([-7.5, -8.8]))
    assert float(z0) == pytest.approx(0.15)  # mean(0.5, -0.2), not clamped
    assert float(kto_reference_point(torch.tensor([-9.0]), torch.tensor([-7.0]))) == 0.0  # clamped at 0
    losses = kto_loss(policy, ref, desirable, z0, beta=0.5, desirable_weight=1.0, undesirable_weight=2.0)
    expected = [1 - sig(0.5 * (1.0 - 0.15)), 2.0 * (1 - sig(0.5 * (0.15 - (-1.0)))), 1 - sig(0.5 * (0.5 - 0.15))]
    assert losses.tolist() == pytest.approx(expected, abs=1e-7)


@pytest.fixture(scope="module")
def tiny(align_cache):
    path = resolve_model_path("tiny-llama")
    return path, load_tokenizer(path)


ROWS = [{"prompt": "What is 2+2?", "completion": " 4", "label": True},
        {"prompt": "Spell cat.", "completion": " dog", "label": False},
        {"prompt": "Say hi.", "completion": " hello there", "label": True},
        {"prompt": "Name a color.", "completion": " seven", "label": False}]


def kto_trainer(tmp_path, tok, model, ref_model=None):
    """TRL's KTOTrainer on ROWS in one batch of 4: beta 0.1, weights 1.0 / 1.3, fp32 on CPU."""
    from trl import KTOConfig, KTOTrainer

    args = KTOConfig(output_dir=str(tmp_path / "trl"), report_to="none", beta=0.1, desirable_weight=1.0,
                     undesirable_weight=1.3, per_device_train_batch_size=4, use_cpu=True, bf16=False,
                     save_strategy="no", logging_strategy="no", max_length=128)
    return KTOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=datasets.Dataset.from_list(ROWS),
                      processing_class=tok)


def test_loss_equals_trl_kto_trainer_on_the_same_batch(tmp_path, tiny):
    path, tok = tiny
    policy, frozen = load_model(path).eval(), load_model(path).eval()
    with torch.no_grad():  # policy != reference, so the loss is not its step-0 value
        for p in policy.model.layers[0].mlp.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
    trainer = kto_trainer(tmp_path, tok, policy, frozen)
    policy.eval()
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(policy, inputs))

    # Our loss on the same sequences: TRL's matched rows, then its mismatched (KL) rows, labels on completions.
    def rows_of(ids, mask, completion):
        return ids, mask, ids.masked_fill(completion == 0, IGNORE)

    a = rows_of(inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])
    b = rows_of(inputs["KL_input_ids"], inputs["KL_attention_mask"], inputs["KL_completion_mask"])
    width = max(a[0].shape[1], b[0].shape[1])
    pad = lambda t, v: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=v)  # noqa: E731
    batch = {"input_ids": torch.cat([pad(a[0], tok.pad_token_id), pad(b[0], tok.pad_token_id)]),
             "attention_mask": torch.cat([pad(a[1], 0), pad(b[1], 0)]),
             "labels": torch.cat([pad(a[2], IGNORE), pad(b[2], IGNORE)]),
             "desirable": torch.as_tensor(inputs["label"], dtype=torch.bool)}
    recipe = SimpleNamespace(kto=SimpleNamespace(beta=0.1, desirable_weight=1.0, undesirable_weight=1.3))
    dist = SimpleNamespace(reduce_sums=lambda d: d, world_size=1)
    with torch.no_grad():
        loss_sum, _ = make_loss_fn(recipe, "model", frozen, dist)(policy, batch)
    assert float(loss_sum) / 4 == pytest.approx(trl_loss, abs=1e-6)
    assert abs(trl_loss - 0.5 * (1.0 + 1.3) / 2) > 1e-4  # informative: not the step-0 value

    # And our own batches of these rows are TRL's sequences (prompt, answer and end of turn, no template).
    answers = load_answers([Row(r, f"x:{i}") for i, r in enumerate(ROWS)], tok,
                           SimpleNamespace(max_length=128, on_bad_row="error"), None, DataReport("train"))
    ours = kto_batch(answers, tok.pad_token_id, "cpu")
    real = ours["attention_mask"].bool()
    for i in range(4):
        trl_ids = inputs["input_ids"][i][inputs["attention_mask"][i].bool()].tolist()
        assert ours["input_ids"][i][real[i]].tolist() == trl_ids, (tok.decode(trl_ids),)


def test_lora_gradient_equals_trl_kto_trainer_on_the_same_batch(tmp_path, tiny):
    """The update, not only the loss: a LoRA policy off its start, the reference its adapter off on both sides
    (TRL: a zeroed "ref" adapter), our batches of the rows against KTOTrainer's; the adapter gradients agree."""
    from peft import LoraConfig, get_peft_model

    path, tok = tiny
    model = get_peft_model(load_model(path), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                        target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer = kto_trainer(tmp_path, tok, model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # policy = base + a non-zero adapter; TRL's "ref" adapter zero = adapter off
                p.copy_(0.2 * torch.randn(p.shape, generator=g) if ".default." in name else torch.zeros_like(p))
    model.eval()  # no dropout; gradients still flow
    adapter = [p for name, p in model.named_parameters() if p.requires_grad]
    assert adapter and all(".default." in name for name, p in model.named_parameters() if p.requires_grad)

    model.zero_grad()
    trl_loss = trainer.compute_loss(model, trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    trl_loss.backward()
    trl_grad = torch.cat([p.grad.flatten() for p in adapter])

    answers = load_answers([Row(r, f"x:{i}") for i, r in enumerate(ROWS)], tok,
                           SimpleNamespace(max_length=128, on_bad_row="error"), None, DataReport("train"))
    recipe = SimpleNamespace(kto=SimpleNamespace(beta=0.1, desirable_weight=1.0, undesirable_weight=1.3))
    dist = SimpleNamespace(reduce_sums=lambda d: d, world_size=1)
    model.zero_grad()
    loss_sum, stats = make_loss_fn(recipe, "adapter", None, dist)(model, kto_batch(answers, tok.pad_token_id, "cpu"))
    (loss_sum / 4).backward()  # the step's loss is the mean over its answers
    ours_grad = torch.cat([p.grad.flatten() for p in adapter])

    assert float(loss_sum.detach()) / 4 == pytest.approx(float(trl_loss.detach()), abs=1e-6)
    assert abs(float(trl_loss.detach()) - 0.5 * (1.0 + 1.3) / 2) > 1e-4  # the adapter moved the policy
    assert float(trl_grad.norm()) > 1e-4
    assert float((ours_grad - trl_grad).norm() / trl_grad.norm()) < 1e-4


def test_tiny_kto_run_on_thumbs_rows(tmp_path, align_cache):
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}],
             "completion": [{"role": "assistant", "content": str(i + 1 if i % 2 else i + 5)}], "label": i % 2 == 1}
            for i in range(40)]
    labels = tmp_path / "thumbs.jsonl"
    datasets.Dataset.from_list(rows).to_json(str(labels))
    out = tmp_path / "kto"
    result = run_cli(["kto", str(REPO / "configs/tiny/kto.yaml"), "--set", f"output_dir={out}",
                      "--set", f"data.train={labels}", "--set", "train.max_steps=4", "--set", "train.eval_interval=2"])
    result.check()
    assert "answers: 18 desirable, 18 undesirable" in result.output  # 10% of 40 rows held out
    metrics = read_metrics(out)
    losses = [m["loss"] for m in metrics if "loss" in m and m.get("step", 0) >= 1]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(0.5, abs=1e-4)  # policy == reference: 1 - sigmoid(0)
    assert any("eval/rewards/margins" in m for m in metrics)
    assert (out / "final" / "config.json").is_file() and json.loads((out / "manifest.json").read_text())["complete"]
