"""The built-in model cache (alignment.core.models.build_once): every entry marked complete is whole
(config, weights, tokenizer), whichever rank of a job built it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, child_env
from alignment.core.distributed import free_port
from alignment.core.models import resolve_model_path


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cold_cache_built_by_rank_1_is_whole(tmp_path):
    """transformers 5 writes save_pretrained files only on torch.distributed rank 0: a rank-1 build used
    to leave a tokenizer without config.json or weights, marked complete, and every later run failed."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / "tests" / "core" / "cache_probe.py"), str(out)]
    result = subprocess.run(cmd, cwd=REPO, env=child_env({"ALIGN_CACHE": str(cache)}), capture_output=True,
                            text=True, timeout=280)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    facts = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, seen in enumerate(facts):
        assert "error" not in seen, f"rank {rank}: {seen}"
        assert seen["layers"] == 2
        assert {"config.json", "model.safetensors", "tokenizer.json", ".complete"} <= set(seen["files"]), seen
    assert facts[0]["path"] == facts[1]["path"]


def test_entry_marked_complete_but_not_whole_is_rebuilt(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from alignment.core.models import resolve_model_path

    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path))
    path = Path(resolve_model_path("tiny-llama"))
    for name in ("config.json", "model.safetensors"):  # what a rank-1 build used to leave out
        (path / name).unlink()
    assert (path / ".complete").exists()
    again = Path(resolve_model_path("tiny-llama"))
    assert again == path and (again / "config.json").is_file() and (again / "model.safetensors").is_file()
    assert AutoModelForCausalLM.from_pretrained(again).config.num_hidden_layers == 2


def test_a_builder_that_writes_no_weights_is_an_error(tmp_path, monkeypatch):
    from alignment.core.models import build_once, model_dir_problems

    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path))

    def tokenizer_only(out: Path) -> None:
        (out / "tokenizer.json").write_text("{}")

    with pytest.raises(RuntimeError, match="config.json"):
        build_once("broken-model", tokenizer_only, check=model_dir_problems)
    assert not (tmp_path / "broken-model").exists(), "nothing is marked complete"


# ---------------------------------------------------------------------------
# Tokenizers without a chat template or a pad token
# ---------------------------------------------------------------------------


def _saved_without_template(tok, folder: Path, **special) -> Path:
    import copy

    bare = copy.deepcopy(tok)
    bare.chat_template = None
    for key, value in special.items():
        setattr(bare, key, value)
    bare.save_pretrained(folder)
    for leftover in folder.glob("chat_template*"):
        leftover.unlink()
    return folder


def test_chatml_fallback_warns_and_is_used_only_when_it_fits(tmp_path):
    from alignment.data import text
    from alignment.core.models import CHATML_TEMPLATE, load_tokenizer

    tiny = load_tokenizer(resolve_model_path("tiny-llama"))
    with pytest.warns(UserWarning, match="no chat template; using ChatML"):
        fits = load_tokenizer(str(_saved_without_template(tiny, tmp_path / "fits")))
    assert fits.chat_template == CHATML_TEMPLATE

    with pytest.warns(UserWarning, match="ChatML cannot stand in .*its EOS is '<|endoftext|>'"):
        other_eos = load_tokenizer(str(_saved_without_template(tiny, tmp_path / "eos", eos_token="<|endoftext|>")))
    assert other_eos.chat_template is None
    with pytest.raises(text.TemplateError, match="no chat template"):
        text.encode(other_eos, [{"role": "user", "content": "hi"}], "ok")


def _no_pad_no_unk_tokenizer():
    """Like Llama-3: no pad, no unk, and no spare special token in the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from alignment.core.models import CHATML_TEMPLATE

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["user assistant What is 2 + 2? It is 4."] * 10, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>")
    tok.chat_template = CHATML_TEMPLATE
    assert tok.pad_token is None and tok.unk_token is None
    return tok


def test_distinct_pad_is_added_with_a_resized_embedding_when_the_vocabulary_has_none():
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from reward.model import ensure_distinct_pad, sequence_rewards

    tok = _no_pad_no_unk_tokenizer()
    vocab = len(tok)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=1, num_attention_heads=2, num_labels=1)).eval()
    ids = torch.tensor([tok("What is 2 + 2? It is 4.").input_ids])
    before = sequence_rewards(model, ids, torch.ones_like(ids))
    ensure_distinct_pad(tok, model)
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == vocab != tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.get_input_embeddings().weight.shape[0] == vocab + 1
    torch.testing.assert_close(sequence_rewards(model, ids, torch.ones_like(ids)), before, rtol=0, atol=0)
