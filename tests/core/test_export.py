"""What ZeRO-3 training on 2 ranks exports to final/ (FAILURES.md rows 1-4).

Every run here is the real CLI with `--nproc 2` and ZeRO-3, so the weights the export writes were
partitioned across ranks while training; final/ must still be a whole Hugging Face directory.
"""

from __future__ import annotations

import json

import pytest
import torch

from helpers import align_cache, load_safetensors_dir, run_sft  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

Z3 = ("deepspeed.zero_stage=3", "train.global_batch_size=8", "train.micro_batch_size=4",
      "train.eval_interval=0", "train.save_interval=0", "data.eval=null")
PROBE = "What is 17 + 25? Answer with just the number."


def strict_load(path, **kwargs):
    """from_pretrained that fails on any missing, unexpected or mismatched key."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"loading {path}: {problems}"
    return model.eval()


@torch.no_grad()
def logits_of(model, tokenizer_dir) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROBE}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    return model(**ids).logits.float()


def config_built(path, dtype=None):
    """A randomly initialised model built from the exported config: the shapes the export must match."""
    from transformers import AutoConfig, AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)


def hand_loaded(path):
    """final/ loaded without from_pretrained: config-built model + the safetensors, tied by hand.

    Built directly in the saved dtype (a later .to() would also cast the fp32 rotary buffers).
    """
    tensors = load_safetensors_dir(path)
    model = config_built(path, dtype=next(iter(tensors.values())).dtype)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected, unexpected
    if model.config.tie_word_embeddings:
        assert set(missing) <= {"lm_head.weight"}, missing
        model.tie_weights()
    else:
        assert not missing, missing
    for name, param in model.named_parameters():
        assert param.dtype == tensors["model.embed_tokens.weight"].dtype, name
    return model.eval()


@pytest.fixture(scope="module")
def full_bf16(tmp_path_factory, align_cache):
    """tiny-llama (tied embeddings), full fine-tune, ZeRO-3, 2 ranks, bf16, 2 steps."""
    out = tmp_path_factory.mktemp("export") / "full-bf16"
    result = run_sft(out, *Z3, "train.precision=bf16", steps=2, nproc=2).check()
    assert "exported and verified" in result.output
    return out


@pytest.fixture(scope="module")
def base_dir(align_cache):
    from alignment.core.models import resolve_model_path

    return resolve_model_path("tiny-llama")


# ---------------------------------------------------------------------------
# Row 1: full fine-tune under ZeRO-3 -> whole tensors, declared dtype, strict reload
# ---------------------------------------------------------------------------


def test_zero3_full_export_is_whole_and_bf16(full_bf16, base_dir):
    final = full_bf16 / "final"
    tensors = load_safetensors_dir(final)
    reference = config_built(final).state_dict()
    config = json.loads((final / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert config["tie_word_embeddings"] is True

    assert set(tensors) <= set(reference), set(tensors) - set(reference)
    assert set(reference) - set(tensors) <= {"lm_head.weight"}, "only the tied head may be left out"
    for name, tensor in tensors.items():
        assert tensor.numel() == reference[name].numel() > 0, f"{name}: {tuple(tensor.shape)}"
        assert tensor.shape == reference[name].shape, name
        assert tensor.dtype == torch.bfloat16, f"{name}: {tensor.dtype}"
        assert torch.isfinite(tensor.float()).all(), name

    # trained weights, not the initial ones and not zeros
    base = load_safetensors_dir(base_dir)
    changed = [n for n in tensors if not torch.equal(tensors[n].float(), base[n].to(torch.bfloat16).float())]
    assert "model.embed_tokens.weight" in changed and "model.layers.1.mlp.down_proj.weight" in changed, changed

    model = strict_load(final)
    assert model.dtype == torch.bfloat16
    for name, param in model.named_parameters():
        assert param.numel() == reference[name].numel(), name
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "tied on reload"


# ---------------------------------------------------------------------------
# Row 2: LoRA under ZeRO-3 -> real adapter tensors, merged/ loads
# ---------------------------------------------------------------------------


def _lora_shapes_ok(adapter: dict, base_model, r: int) -> tuple[int, int]:
    modules = dict(base_model.named_modules())
    n_a = n_b = 0
    for key, tensor in adapter.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        module_name = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        linear = modules[module_name]
        if ".lora_A." in key:
            assert tuple(tensor.shape) == (r, linear.in_features), f"{key}: {tuple(tensor.shape)}"
            n_a += 1
        else:
            assert tuple(tensor.shape) == (linear.out_features, r), f"{key}: {tuple(tensor.shape)}"
            assert tensor.abs().max() > 0, f"{key} is all zero: the adapter did not train or was not gathered"
            n_b += 1
    return n_a, n_b


def test_zero3_lora_adapter_is_whole(tmp_path, base_dir):
    from peft import PeftModel

    out = tmp_path / "lora"
    run_sft(out, *Z3, "lora.enabled=true", "lora.r=8", "lora.alpha=16", steps=2, nproc=2).check()
    final = out / "final"
    adapter = load_safetensors_dir(final, "adapter_model.safetensors")
    base = strict_load(base_dir)
    n_a, n_b = _lora_shapes_ok(adapter, base, r=8)
    # all-linear on a 2-layer Llama: q, k, v, o, gate, up, down in each layer
    assert n_a == n_b == 14, (n_a, n_b)
    assert json.loads((final / "adapter_config.json").read_text())["r"] == 8

    merged = strict_load(final / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    _assert_tied(final / "merged", merged)  # row 4 through the LoRA merge path: tiny-llama stays tied
    adapted = PeftModel.from_pretrained(strict_load(base_dir), final).eval()
    torch.testing.assert_close(logits_of(merged, final), logits_of(adapted, final), rtol=0, atol=1e-4)
    assert not torch.allclose(logits_of(merged, final), logits_of(base, final), atol=1e-4), "merged == base"


# ---------------------------------------------------------------------------
# Row 3: LoRA + modules_to_save under ZeRO-3
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("modules", [["lm_head"], ["embed_tokens", "lm_head"]], ids=["head", "embeddings-and-head"])
def test_zero3_lora_modules_to_save(tmp_path, base_dir, modules):
    """modules_to_save on tiny-llama, whose lm_head is tied to embed_tokens (FAILURES row 3: peft#2450 saved the
    embeddings' copies as size-0 tensors under ZeRO-3 and the merge failed).

    peft saves a full trainable copy of each module; it must be whole (vocab, hidden), trained, and the
    merged model's logits must equal the adapter model's (the copies must survive the tied config).
    """
    from peft import PeftModel

    out = tmp_path / "lora-mts"
    run_sft(out, *Z3, "lora.enabled=true", "lora.r=8", f"lora.modules_to_save=[{','.join(modules)}]", steps=2,
            nproc=2).check()
    final = out / "final"
    adapter = load_safetensors_dir(final, "adapter_model.safetensors")
    base = strict_load(base_dir)
    _lora_shapes_ok(adapter, base, r=8)
    copies = {k: v for k, v in adapter.items() if "lora_" not in k}
    assert copies, f"no modules_to_save copy in the adapter: {sorted(adapter)}"
    vocab, hidden = base.config.vocab_size, base.config.hidden_size
    assert {m for m in modules if any(m in key for key in copies)} == set(modules), sorted(copies)
    for key, tensor in copies.items():
        assert any(m in key for m in modules), key
        assert tuple(tensor.shape) == (vocab, hidden), f"{key}: {tuple(tensor.shape)}"
        assert not torch.equal(tensor, base.lm_head.weight.detach()), f"{key} did not train"

    adapted = PeftModel.from_pretrained(strict_load(base_dir), final).eval()
    merged = strict_load(final / "merged")
    torch.testing.assert_close(logits_of(merged, final), logits_of(adapted, final), rtol=0, atol=1e-3)


# ---------------------------------------------------------------------------
# Row 4: tied and untied embeddings
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory, base_dir):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("untied-model")
    config = AutoConfig.from_pretrained(base_dir)
    config.tie_word_embeddings = False
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = AutoModelForCausalLM.from_config(config)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return out


def test_untied_embeddings_export(tmp_path, untied_dir):
    out = tmp_path / "untied"
    result = run_sft(out, *Z3, f"model.name_or_path={untied_dir}", steps=2, nproc=2).check()
    assert "exported and verified" in result.output
    final = out / "final"
    tensors = load_safetensors_dir(final)
    assert json.loads((final / "config.json").read_text())["tie_word_embeddings"] is False
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(tensors)
    assert not torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
    start = load_safetensors_dir(untied_dir)
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        assert not torch.equal(tensors[name], start[name]), f"{name} did not train"

    model = strict_load(final)
    assert set(dict(model.named_parameters())) == set(tensors)
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    got = logits_of(model, final)
    torch.testing.assert_close(got, logits_of(hand_loaded(final), final), rtol=0, atol=1e-6)

    # the live model's logits saved by the run (fixed input) against the strict reload, fp32: tight
    from alignment.core.export import fixed_input
    from transformers import AutoTokenizer

    from safetensors.torch import load_file

    expected = load_file(str(out / ".final-expected.safetensors"))["outputs"]
    with torch.no_grad():
        reloaded = model(**fixed_input(AutoTokenizer.from_pretrained(final)), use_cache=False).logits.float()
    torch.testing.assert_close(reloaded, expected, rtol=0, atol=1e-4)


def test_tied_embeddings_export(full_bf16):
    final = full_bf16 / "final"
    tensors = load_safetensors_dir(final)
    if "lm_head.weight" in tensors:  # saved under both names: must be the same values
        assert torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
    model = strict_load(final)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    torch.testing.assert_close(logits_of(model, final), logits_of(hand_loaded(final), final), rtol=0, atol=1e-6)


@pytest.mark.parametrize("zero,nproc", [(2, 1), (3, 2)])
def test_export_dtype_fp32_writes_the_fp32_master_weights(zero, nproc, tmp_path, base_dir):
    """A bf16 run with model.export_dtype=fp32 writes the optimizer's fp32 masters, not the bf16 weights rounded
    from them: the values are not all bf16-representable, and they reload at the declared float32."""
    out = tmp_path / "run"
    sets = (f"deepspeed.zero_stage={zero}", "train.global_batch_size=8", "train.micro_batch_size=4",
            "train.eval_interval=0", "train.save_interval=0", "data.eval=null", "train.precision=bf16",
            "model.export_dtype=fp32", "train.learning_rate=1e-5")
    result = run_sft(out, *sets, steps=2, nproc=nproc).check()
    assert "exported and verified" in result.output
    final = out / "final"
    assert json.loads((final / "config.json").read_text())["dtype"] == "float32"
    tensors = load_safetensors_dir(final)
    base = load_safetensors_dir(base_dir)
    name = "model.layers.1.mlp.down_proj.weight"
    weight = tensors[name]
    assert weight.dtype == torch.float32
    assert not torch.equal(weight, base[name].float()), "trained"
    # bf16 weights widened to fp32 would all be bf16 values; fp32 masters moved by lr 1e-5 are not
    assert (weight.to(torch.bfloat16).float() != weight).float().mean() > 0.5
    model = strict_load(final)
    assert model.dtype == torch.float32
    _assert_tied(final, model)  # row 4 through the fp32-master path


def _assert_tied(final, model) -> None:
    """A tied model's export (FAILURES row 4): still tied in its config, the head and the embeddings one tensor
    after a strict reload, and equal where the head was also saved under its own name."""
    assert json.loads((final / "config.json").read_text()).get("tie_word_embeddings", True) is True
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tensors = load_safetensors_dir(final)
    if "lm_head.weight" in tensors:
        assert torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
