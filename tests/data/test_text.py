"""One tokenization path (alignment.data.text): the ids that training, scoring and generation see for the
same (prompt, response) are identical, for a tokenizer that adds BOS and for one that does not; the
reward model's sequence is the standard rendering; no completion token is lost at a merged boundary."""

from __future__ import annotations

import pytest
import torch

from helpers import END, bos_adding_tokenizer, sentencepiece_style_tokenizer
from alignment.data import text
from alignment.core.config import DataConfig
from alignment.data.layout import IGNORE
from alignment.data.report import DataReport
from alignment.data.sft import build_sft_examples
from alignment.data.sources import Row
from alignment.core.models import CHATML_TEMPLATE, load_tokenizer, resolve_model_path
from alignment.data.preference import load_pairs

PROMPT = [{"role": "user", "content": "What is 17 + 25? Answer with just the number."}]
RESPONSE = [{"role": "assistant", "content": "42"}]
OTHER = [{"role": "assistant", "content": "The answer is 41."}]


@pytest.fixture(scope="module")
def tiny_tok():
    return load_tokenizer(resolve_model_path("tiny-llama"))


@pytest.fixture(scope="module", params=["no-bos", "bos"])
def tok(request, tiny_tok):
    t = tiny_tok if request.param == "no-bos" else bos_adding_tokenizer(tiny_tok, CHATML_TEMPLATE)
    assert text.adds_bos(t) == (request.param == "bos")
    return t


def _cfg(**kw) -> DataConfig:
    return DataConfig(train="unused", max_length=512, **kw)


def test_encode_cuts_prompt_response_and_suffix(tok):
    enc = text.encode(tok, PROMPT, RESPONSE)
    rendered = tok(tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False).input_ids
    if text.adds_bos(tok):  # exactly one BOS in front
        assert enc.prompt_ids == [tok.bos_token_id] + rendered and rendered[0] != tok.bos_token_id
    else:
        assert enc.prompt_ids == rendered
    assert tok.decode(enc.response_ids) == "42" + END, "the response ends with the end-of-turn token"
    assert tok.decode(enc.suffix_ids) == "\n", "ChatML's newline after <|im_end|> is the suffix"
    assert not enc.resplit


def test_training_scoring_and_generation_see_the_same_ids(tok):
    from alignment.evaluate.gold import generation_batch
    from reward.scorer import sequence_ids

    enc = text.encode(tok, PROMPT, RESPONSE)
    # The plain way (RewardBench, TRL): the chat template over the whole conversation, tokenized as is.
    plain = tok(tok.apply_chat_template(PROMPT + RESPONSE, tokenize=False)).input_ids
    assert enc.reward_ids == plain

    row = Row({"prompt": PROMPT, "chosen": RESPONSE, "rejected": OTHER}, "t:1")
    (dpo,) = load_pairs([row], tok, _cfg(), None, DataReport("dpo"))
    (rm,) = load_pairs([row], tok, _cfg(), None, DataReport("rm"), reward_model=True)
    assert dpo.prompt_ids + dpo.chosen_ids == enc.policy_ids, "DPO trains on prompt + response"
    assert rm.prompt_ids + rm.chosen_ids == enc.reward_ids == plain, "the RM trains on the standard rendering"
    assert sequence_ids(tok, PROMPT, RESPONSE, 512) == plain, "align score reads the same sequence"

    (sft,) = build_sft_examples([Row({"messages": PROMPT + RESPONSE}, "t:2")], tok, _cfg(), True, DataReport("s"))
    assert sft.input_ids == enc.reward_ids
    assert [t for t, lab in zip(sft.input_ids, sft.labels) if lab != IGNORE] == enc.response_ids

    batch = generation_batch(tok, [PROMPT, PROMPT + RESPONSE + [{"role": "user", "content": "And 1 + 1?"}]])
    first = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert first == enc.prompt_ids, "generation starts from the prompt ids training uses"
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][1].all(), "left padding"


def test_generation_produces_the_training_response_ids(tok):
    """A model forced to emit the response's ids, through the real `generate` path, stops at its
    end-of-turn token and returns exactly the ids training puts after the prompt."""
    from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

    from alignment.evaluate.gold import generate_ids

    enc = text.encode(tok, PROMPT, RESPONSE)

    class Force(LogitsProcessor):
        def __call__(self, input_ids, scores):
            step = input_ids.shape[1] - len(enc.prompt_ids)
            forced = torch.full_like(scores, -1e9)
            forced[:, enc.response_ids[min(step, len(enc.response_ids) - 1)]] = 0
            return forced

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)).eval()
    (generated,) = generate_ids(model, tok, [PROMPT], max_new_tokens=10, batch_size=1, device=torch.device("cpu"),
                                logits_processor=LogitsProcessorList([Force()]))
    assert generated == enc.response_ids


def test_stop_tokens_include_the_end_of_turn_token(tiny_tok):
    assert text.stop_token_ids(tiny_tok) == [tiny_tok.convert_tokens_to_ids(END)]
    llama3_like = bos_adding_tokenizer(tiny_tok, CHATML_TEMPLATE)
    llama3_like.eos_token = "<|endoftext|>"  # base-model EOS; turns end with <|im_end|>
    assert set(text.stop_token_ids(llama3_like)) == {llama3_like.eos_token_id, llama3_like.convert_tokens_to_ids(END)}


def test_fit_keeps_bos_and_the_end_of_the_prompt():
    prompt, (a, b), cut = text.fit([1, 10, 11, 12, 13, 14], [[20, 21, 22], [30]], 6, None, bos_id=1)
    assert cut and prompt == [1, 13, 14] and a == [20, 21, 22] and b == [30]
    assert text.fit([5, 6], [[7]], 8, None, bos_id=1) == ([5, 6], [[7]], False)


def test_no_chat_template_is_a_clear_error(tiny_tok):
    import copy

    bare = copy.deepcopy(tiny_tok)
    bare.chat_template = None
    with pytest.raises(text.TemplateError, match="no chat template"):
        text.encode(bare, PROMPT, RESPONSE)
    # raw text needs no template
    assert text.encode(bare, "Q: 2+2? A:", " 4").response_ids[-1] == bare.eos_token_id


# ---------------------------------------------------------------------------
# A token that merges across the prompt/completion boundary (SentencePiece, prompt ending in a space)
# ---------------------------------------------------------------------------


def test_sft_keeps_the_first_completion_token_at_a_merged_boundary():
    tok = sentencepiece_style_tokenizer()
    prompt, completion = "[INST] What is 2 + 2? [/INST] ", "Sure"
    merged = tok(prompt + completion, add_special_tokens=False).input_ids
    alone = tok(prompt, add_special_tokens=False).input_ids
    assert merged[: len(alone)] != alone, "the fixture must merge a token across the boundary"

    report = DataReport("train")
    (example,) = build_sft_examples([Row({"prompt": prompt, "completion": completion}, "sft.jsonl:3")], tok,
                                    _cfg(), True, report)
    supervised = [t for t, lab in zip(example.input_ids, example.labels) if lab != IGNORE]
    assert tok.decode(supervised) == completion + tok.eos_token
    assert example.input_ids[0] == tok.bos_token_id and example.input_ids.count(tok.bos_token_id) == 1
    assert report.notes["response re-tokenized at the prompt boundary"] == 1, report.format()
    # generation would start from exactly the prompt ids training put before the completion
    assert example.input_ids[: len(example.input_ids) - len(supervised)] == text.prompt_ids(tok, prompt)
