"""Tests for alignment.data.preference: every row shape, malformed and unusable rows, the real hh-rlhf
file, BOS/EOS handling (FAILURES row 12), truncation (rows 13, 14) and collation.

Tokenizers only, except one tiny-model forward for the finite-loss check of row 13.
"""

from __future__ import annotations

import copy
import json
from collections import Counter

import pytest
import torch

from alignment.core.config import DataConfig
from alignment.data.layout import IGNORE
from alignment.data.report import DataReport
from alignment.data.sources import DataError, Row, read_rows
from alignment.core.models import CHATML_TEMPLATE, load_model, load_tokenizer, resolve_model_path
from alignment.data.layout import collate_pairs
from alignment.data.preference import PairRejected, PreferencePair, TokenizedPair, load_pairs, to_pair, tokenize_pair
from alignment.data.shapes import parse_hh_transcript

END = "<|im_end|>"


def _row(data: dict, origin: str = "prefs.jsonl:7") -> Row:
    return Row(data, origin)


def _cfg(**kw) -> DataConfig:
    return DataConfig(train="unused", **kw)


def _user(text):
    return [{"role": "user", "content": text}]


def _asst(text):
    return [{"role": "assistant", "content": text}]


# ---------------------------------------------------------------------------
# tokenizers
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tok():
    return load_tokenizer(resolve_model_path("tiny-llama"))


@pytest.fixture(scope="module")
def smol_tok():
    return load_tokenizer(resolve_model_path("smollm2-135m"))


@pytest.fixture(scope="module")
def nobos_tok(tiny_tok):
    """Like Qwen2: no bos_token at all."""
    t = copy.deepcopy(tiny_tok)
    t.bos_token = None
    assert t.bos_token is None and t.bos_token_id is None
    return t


def _bos_adding(tiny_tok, template: str):
    """A tokenizer whose encoder prepends BOS (`<|endoftext|>`) when add_special_tokens=True."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tiny_tok.backend_tokenizer.to_str())
    bos_id = backend.token_to_id("<|endoftext|>")
    backend.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A $B", special_tokens=[("<|endoftext|>", bos_id)]
    )
    t = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token=END, pad_token="<pad>")
    t.chat_template = template
    assert t("a").input_ids[0] == bos_id == t.bos_token_id
    return t


@pytest.fixture(scope="module")
def bos_tok(tiny_tok):
    """Encoder adds BOS, the chat template does not write it (Llama-2 style)."""
    return _bos_adding(tiny_tok, CHATML_TEMPLATE)


@pytest.fixture(scope="module")
def gemma_like_tok(tiny_tok):
    """Encoder adds BOS and the chat template writes it too (Gemma)."""
    return _bos_adding(tiny_tok, "{{ bos_token }}" + CHATML_TEMPLATE)


# ---------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------


def test_explicit_strings():
    pair = to_pair(_row({"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"}))
    assert pair == PreferencePair("Q: 2+2?", " 4", " 5", "prefs.jsonl:7", None)
    with_margin = to_pair(_row({"prompt": "Q", "chosen": "a", "rejected": "b", "margin": "1.5"}))
    assert with_margin.margin == 1.5


def test_explicit_message_lists():
    row = {"prompt": _user("hi"), "chosen": _asst("hello"), "rejected": _asst("go away"), "margin": 2}
    pair = to_pair(_row(row))
    assert pair.prompt == _user("hi") and pair.chosen == _asst("hello") and pair.rejected == _asst("go away")
    assert pair.margin == 2.0
    # A string prompt with message responses becomes one user turn; a message prompt with string
    # responses wraps them as assistant turns.
    mixed = to_pair(_row({"prompt": "hi", "chosen": _asst("hello"), "rejected": _asst("bye")}))
    assert mixed.prompt == _user("hi")
    mixed2 = to_pair(_row({"prompt": _user("hi"), "chosen": "hello", "rejected": "bye"}))
    assert mixed2.chosen == _asst("hello") and mixed2.rejected == _asst("bye")
    # Extra message keys are dropped.
    extra = to_pair(_row({"prompt": [{"role": "user", "content": "hi", "name": "x"}], "chosen": _asst("a"),
                          "rejected": _asst("b")}))
    assert extra.prompt == _user("hi")


def test_implicit_conversational():
    system = [{"role": "system", "content": "Be brief."}]
    shared = system + _user("What is 2+2?") + _asst("4") + _user("And 3+3?")
    pair = to_pair(_row({"chosen": shared + _asst("6"), "rejected": shared + _asst("7")}))
    assert pair.prompt == shared
    assert pair.chosen == _asst("6") and pair.rejected == _asst("7")
    assert pair.margin is None


HH_CHOSEN = ("\n\nHuman: How do I bake bread?\n\nAssistant: Do you have yeast?"
             "\n\nHuman: Yes.\n\nAssistant: Mix flour, water, salt and yeast, then knead.")
HH_REJECTED = ("\n\nHuman: How do I bake bread?\n\nAssistant: Do you have yeast?"
               "\n\nHuman: Yes.\n\nAssistant: Buy it at a shop.")


def test_hh_transcript():
    pair = to_pair(_row({"chosen": HH_CHOSEN, "rejected": HH_REJECTED}))
    assert pair.prompt == [
        {"role": "user", "content": "How do I bake bread?"},
        {"role": "assistant", "content": "Do you have yeast?"},
        {"role": "user", "content": "Yes."},
    ]
    assert pair.chosen == _asst("Mix flour, water, salt and yeast, then knead.")
    assert pair.rejected == _asst("Buy it at a shop.")
    # Named explicitly, the same.
    assert to_pair(_row({"chosen": HH_CHOSEN, "rejected": HH_REJECTED}), "hh") == pair
    assert parse_hh_transcript("\n\nHuman: a\n\nAssistant: b", "o", "chosen") == _user("a") + _asst("b")


@pytest.mark.parametrize("label, a_wins", [(0, True), (1, False), ("a", True), ("b", False), ("A", True), ("1", False)])
def test_ab_with_label(label, a_wins):
    row = {"prompt": "Which is better?", "response_a": "first", "response_b": "second", "label": label}
    pair = to_pair(_row(row))
    assert (pair.chosen, pair.rejected) == (("first", "second") if a_wins else ("second", "first"))
    assert pair.prompt == "Which is better?" and pair.margin is None


def test_ab_with_scores():
    row = {"prompt": _user("Which?"), "response_a": "first", "response_b": "second", "score_a": 2.5, "score_b": 7.0}
    pair = to_pair(_row(row))
    assert pair.chosen == _asst("second") and pair.rejected == _asst("first")
    assert pair.margin == pytest.approx(4.5, abs=1e-12)
    row = {"prompt": "Which?", "response_a": "first", "response_b": "second", "score_a": "9", "score_b": -1}
    pair = to_pair(_row(row))
    assert (pair.chosen, pair.rejected, pair.margin) == ("first", "second", 10.0)
    with pytest.raises(PairRejected) as info:
        to_pair(_row({"prompt": "Which?", "response_a": "x", "response_b": "y", "score_a": 3, "score_b": 3.0}))
    assert info.value.reason == "tied scores"


MALFORMED = [
    # (row, field named in the message)
    ({"prompt": "q", "chosen": 5, "rejected": "b"}, "chosen"),
    ({"prompt": "q", "chosen": "a", "rejected": None}, "rejected"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "prompt"),
    ({"prompt": "q", "chosen": "a", "rejected": _asst("b")}, "chosen"),
    ({"prompt": "q", "chosen": [{"role": "assistant"}], "rejected": _asst("b")}, "chosen[0]"),
    ({"prompt": "q", "chosen": _asst("a"), "rejected": [{"role": "robot", "content": "b"}]}, "rejected[0].role"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "margin"),
    ({"chosen": _user("hi"), "rejected": _user("hi") + _asst("b")}, "chosen"),          # implicit, no assistant
    ({"chosen": HH_CHOSEN, "rejected": "no turns here"}, "rejected"),                      # hh, unparseable side
    ({"prompt": "q", "response_a": "x", "response_b": "y", "label": "c"}, "label"),
    ({"prompt": "q", "response_a": "x", "response_b": "y", "score_a": "high", "score_b": 1}, "score_a"),
    ({"prompt": "q", "response_a": "x", "response_b": "y"}, "label"),
    ({"prompt": "q", "response_a": 1, "response_b": "y", "label": 0}, "response_a"),
    ({"question": "q", "answer": "a"}, "fields"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "chosen_truncated": "yes"}, "chosen_truncated"),
]


@pytest.mark.parametrize("row, field", MALFORMED, ids=[f"{i}-{f}" for i, (_, f) in enumerate(MALFORMED)])
def test_malformed_rows_name_origin_and_field(row, field):
    with pytest.raises(DataError) as info:
        to_pair(_row(row, "data/prefs.jsonl:42"))
    message = str(info.value)
    assert message.startswith("data/prefs.jsonl:42: "), message
    assert field in message, message


def test_unknown_format_name():
    with pytest.raises(DataError, match="prefs.jsonl:7: unknown preference format 'kto'"):
        to_pair(_row({"prompt": "q", "chosen": "a", "rejected": "b"}), "kto")


UNUSABLE = [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "chosen identical to rejected"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "empty response"),
    ({"prompt": _user("q"), "chosen": _asst(""), "rejected": _asst("b")}, "empty response"),
    ({"chosen": _user("q") + _asst("a"), "rejected": _user("other") + _asst("b")}, "chosen and rejected have different prompts"),
    ({"chosen": _asst("a"), "rejected": _asst("b")}, "no prompt before the final assistant turn"),
    ({"chosen": HH_CHOSEN, "rejected": HH_REJECTED.replace("Yes.", "No.")}, "chosen and rejected have different prompts"),
]


@pytest.mark.parametrize("row, reason", UNUSABLE, ids=[r for _, r in UNUSABLE])
def test_unusable_rows_are_rejected_with_reason(row, reason):
    with pytest.raises(PairRejected) as info:
        to_pair(_row(row))
    assert info.value.reason == reason


def test_load_pairs_counts_every_row(tiny_tok):
    good = {"prompt": "q", "chosen": " yes", "rejected": " no"}
    rows = [_row(good, "f:1"), _row(UNUSABLE[0][0], "f:2"), _row(MALFORMED[0][0], "f:3"),
            _row(UNUSABLE[3][0], "f:4"), _row(good, "f:5")]
    report = DataReport("t")
    pairs = load_pairs(rows, tiny_tok, _cfg(on_bad_row="skip"), None, report)
    assert [p.origin for p in pairs] == ["f:1", "f:5"]
    assert report.rows_read == 5 and report.examples == 2
    assert report.dropped == Counter({"chosen identical to rejected": 1, "chosen and rejected have different prompts": 1})
    assert sum(report.skipped_bad_rows.values()) == 1 and "f:3" in report.first_errors[0]
    assert report.rows_read == report.examples + sum(report.dropped.values()) + sum(report.skipped_bad_rows.values())
    # on_bad_row=error stops at the malformed row, naming it.
    with pytest.raises(DataError, match="f:3: field 'chosen'"):
        load_pairs(rows, tiny_tok, _cfg(on_bad_row="error"), None, DataReport("t"))


# ---------------------------------------------------------------------------
# The real hh-rlhf file
# ---------------------------------------------------------------------------


def _independent_hh_counts(path) -> tuple[int, set[int], set[int]]:
    """(rows, line numbers whose context before the last Assistant turn differs, line numbers with an
    empty final reply), with plain string operations, independently of the package's parser."""
    rows, diff, empty = 0, set(), set()
    marker = "\n\nAssistant:"
    for number, line in enumerate(open(path, encoding="utf-8"), start=1):
        if not line.strip():
            continue
        rows += 1
        r = json.loads(line)
        c, j = r["chosen"], r["rejected"]
        ic, ij = c.rfind(marker), j.rfind(marker)
        if c[:ic].strip() != j[:ij].strip():
            diff.add(number)
        elif not c[ic + len(marker):].strip() or not j[ij + len(marker):].strip():
            empty.add(number)
    return rows, diff, empty


def test_hh_rlhf_real_file_report(hh_path, tiny_tok):
    n_rows, diff, empty = _independent_hh_counts(hh_path)
    assert (n_rows, len(diff), len(empty)) == (1800, 5, 4)

    rows = read_rows(str(hh_path))
    assert len(rows) == 1800
    report = DataReport("hh")
    pairs = load_pairs(rows, tiny_tok, _cfg(max_length=256, on_bad_row="skip"), None, report)
    assert report.rows_read == 1800
    assert report.dropped == Counter({"chosen and rejected have different prompts": 5, "empty response": 4}), report.format()
    assert not report.skipped_bad_rows, report.format()
    assert report.examples == len(pairs) == 1800 - 9
    assert report.rows_read == report.examples + sum(report.dropped.values()) + sum(report.skipped_bad_rows.values())
    assert report.truncated > 0
    for p in pairs:
        assert len(p.sequence("chosen")) <= 256 and len(p.sequence("rejected")) <= 256
        assert p.chosen_ids and p.rejected_ids and p.chosen_ids != p.rejected_ids
    # The dropped rows are exactly the ones the independent count finds (by line number).
    kept = {int(p.origin.rsplit(":", 1)[1]) for p in pairs}
    assert kept == set(range(1, 1801)) - diff - empty
    for reason, lines in (("chosen and rejected have different prompts", diff), ("empty response", empty)):
        for number in lines:
            with pytest.raises(PairRejected) as info:
                to_pair(rows[number - 1])
            assert info.value.reason == reason, number


def test_builtin_prefs_load_cleanly(tiny_tok):
    rows = read_rows("builtin:prefs_train")[:200]
    report = DataReport("b")
    pairs = load_pairs(rows, tiny_tok, _cfg(max_length=512), None, report)
    assert report.examples == 200 and not report.dropped and not report.skipped_bad_rows, report.format()
    eos = tiny_tok.eos_token_id
    for p in pairs:
        assert p.chosen_ids[-1] == eos and p.rejected_ids[-1] == eos


# ---------------------------------------------------------------------------
# FAILURES row 12: BOS / EOS
# ---------------------------------------------------------------------------

CHAT_ROW = {"prompt": _user("How do I boil an egg?"),
            "chosen": _asst("Put it in boiling water for eight minutes."),
            "rejected": _asst("No idea.")}


def _tokenized(tok, row, max_length=512, max_prompt_length=None) -> TokenizedPair:
    return tokenize_pair(to_pair(_row(row)), tok, max_length, max_prompt_length, DataReport("t"))


def _check_no_none(tp: TokenizedPair):
    for ids in (tp.prompt_ids, tp.chosen_ids, tp.rejected_ids):
        assert all(type(i) is int for i in ids), ids


def test_smollm2_template_single_bos_single_eos_failures_12(smol_tok):
    tok = smol_tok
    start = tok.convert_tokens_to_ids("<|im_start|>")
    eos = tok.eos_token_id
    assert tok.bos_token_id == start  # the template itself emits the BOS-like <|im_start|>
    tp = _tokenized(tok, CHAT_ROW)
    _check_no_none(tp)
    for which, text in (("chosen", "Put it in boiling water for eight minutes."), ("rejected", "No idea.")):
        seq = tp.sequence(which)
        assert seq[0] == start and seq[1] != start, "exactly one BOS-like start"
        response = tp.chosen_ids if which == "chosen" else tp.rejected_ids
        assert response[-1] == eos and response.count(eos) == 1, "exactly one <|im_end|> ending the response"
        assert tok.decode(response) == text + END
        # The whole sequence is the template's rendering, with nothing repeated.
        rendered = tok.apply_chat_template(CHAT_ROW["prompt"] + CHAT_ROW[which], tokenize=False)
        assert tok.decode(seq) == rendered.rstrip()
        # The prompt is not repeated inside the response.
        assert "How do I boil an egg?" not in tok.decode(response)
        assert start not in response or tok.decode(response).count("<|im_start|>") == 0
    assert tok.decode(tp.prompt_ids).endswith("<|im_start|>assistant\n")


def test_a_truncated_sample_trains_as_sampled_without_an_end_of_turn(smol_tok):
    # `align pairs` marks a sample that max_new_tokens cut (FAILURES row 11): the policy never produced the
    # end-of-turn token, so neither DPO (policy ids) nor a reward model (the standard rendering) may see one.
    eos = smol_tok.eos_token_id
    for reward_model in (False, True):
        finished = tokenize_pair(to_pair(_row(CHAT_ROW)), smol_tok, 512, None, DataReport("t"), reward_model)
        cut = tokenize_pair(to_pair(_row(dict(CHAT_ROW, chosen_truncated=True))), smol_tok, 512, None,
                            DataReport("t"), reward_model)
        assert cut.prompt_ids == finished.prompt_ids and cut.rejected_ids == finished.rejected_ids
        assert finished.chosen_ids[: len(cut.chosen_ids) + 1][-1] == eos
        assert cut.chosen_ids == finished.chosen_ids[: len(cut.chosen_ids)] and eos not in cut.chosen_ids
        assert smol_tok.decode(cut.chosen_ids) == "Put it in boiling water for eight minutes."
    both = to_pair(_row(dict(CHAT_ROW, chosen_truncated=True, rejected_truncated=True)))
    assert (both.chosen_truncated, both.rejected_truncated) == (True, True)
    assert to_pair(_row(CHAT_ROW)).chosen_truncated is False
    # Raw text (no template): the EOS the loader appends is what a truncated sample lacks.
    raw = _tokenized(smol_tok, {"prompt": "Q: 2+2?\nA:", "chosen": " 4 and then", "rejected": " 5",
                                "chosen_truncated": True})
    assert eos not in raw.chosen_ids and raw.rejected_ids[-1] == eos


def test_smollm2_plain_text_pair_single_eos(smol_tok):
    tp = _tokenized(smol_tok, {"prompt": "Question: 2+2?\nAnswer:", "chosen": " 4", "rejected": " 5" + END})
    _check_no_none(tp)
    eos = smol_tok.eos_token_id
    for response in (tp.chosen_ids, tp.rejected_ids):
        assert response[-1] == eos and response.count(eos) == 1
    assert eos not in tp.prompt_ids


def test_no_bos_tokenizer_has_no_none_failures_12(nobos_tok):
    tp = _tokenized(nobos_tok, CHAT_ROW)
    _check_no_none(tp)
    assert None not in tp.sequence("chosen") + tp.sequence("rejected")
    assert tp.prompt_ids[0] == nobos_tok.convert_tokens_to_ids("<|im_start|>")  # the template's own start, nothing added
    batch = collate_pairs([tp], nobos_tok.pad_token_id)
    assert batch["input_ids"].dtype == torch.long
    tp2 = _tokenized(nobos_tok, {"prompt": "Q:", "chosen": " a", "rejected": " b"})
    _check_no_none(tp2)
    assert tp2.chosen_ids[-1] == nobos_tok.eos_token_id


@pytest.mark.parametrize("name", ["bos_tok", "gemma_like_tok"])
def test_bos_adding_tokenizers_get_exactly_one_bos(request, name):
    tok = request.getfixturevalue(name)
    bos = tok.bos_token_id
    for row in (CHAT_ROW, {"prompt": "Q:", "chosen": " a", "rejected": " b"}):
        tp = _tokenized(tok, row)
        _check_no_none(tp)
        for which in ("chosen", "rejected"):
            seq = tp.sequence(which)
            assert seq[0] == bos and seq.count(bos) == 1, (name, seq[:4])
        assert bos not in tp.chosen_ids and bos not in tp.rejected_ids


def test_prompt_truncation_keeps_the_bos(bos_tok):
    row = {"prompt": _user(" ".join(["the"] * 100)), "chosen": _asst("yes"), "rejected": _asst("no")}
    tp = _tokenized(bos_tok, row, max_length=64)
    assert len(tp.sequence("chosen")) <= 64
    for which in ("chosen", "rejected"):
        seq = tp.sequence(which)
        assert seq[0] == bos_tok.bos_token_id and seq.count(bos_tok.bos_token_id) == 1, seq[:4]


def test_template_prefix_mismatch_is_a_data_error(tiny_tok):
    """A chat template that does not render the prompt as a prefix of the conversation."""
    tok = copy.deepcopy(tiny_tok)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>bot\n{{ m['content'] }}<|im_end|>\n"
        "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    row = _row(CHAT_ROW, "data/prefs.jsonl:42")
    with pytest.raises(DataError) as info:
        load_pairs([row], tok, _cfg(on_bad_row="error"), None, DataReport("t"))
    assert "prefix" in str(info.value)
    # With on_bad_row=skip it is counted, not lost.
    report = DataReport("t")
    assert load_pairs([row], tok, _cfg(on_bad_row="skip"), None, report) == []
    assert sum(report.skipped_bad_rows.values()) == 1


def test_template_error_message_starts_with_origin(tiny_tok):
    tok = copy.deepcopy(tiny_tok)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>bot\n{{ m['content'] }}<|im_end|>\n"
        "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(DataError) as info:
        load_pairs([_row(CHAT_ROW, "data/prefs.jsonl:42")], tok, _cfg(on_bad_row="error"), None, DataReport("t"))
    assert str(info.value).startswith("data/prefs.jsonl:42: "), str(info.value)


# ---------------------------------------------------------------------------
# FAILURES rows 13 and 14: truncation
# ---------------------------------------------------------------------------


def _response_of_length(tok, prompt, n: int) -> str:
    """An assistant reply whose response ids (including <|im_end|>) are exactly n tokens."""
    for k in range(1, 2 * n + 10):
        text = "the" + " the" * (k - 1)
        tp = _tokenized(tok, {"prompt": prompt, "chosen": _asst(text), "rejected": _asst("x")}, max_length=100_000)
        if len(tp.chosen_ids) == n:
            return text
        if len(tp.chosen_ids) > n:
            break
    raise AssertionError(f"no reply of exactly {n} tokens")


def test_short_chosen_long_rejected_failures_13(tiny_tok, tiny_path_model):
    tok = tiny_tok
    prompt = _user("Say something.")
    row = {"prompt": prompt, "chosen": _asst(_response_of_length(tok, prompt, 10)),
           "rejected": _asst(_response_of_length(tok, prompt, 600))}
    full = _tokenized(tok, row, max_length=100_000)
    assert (len(full.chosen_ids), len(full.rejected_ids)) == (10, 600)

    report = DataReport("t")
    pairs = load_pairs([_row(row)], tok, _cfg(max_length=512), None, report)
    assert report.rows_read == 1 and not report.dropped, report.format()
    (tp,) = pairs  # kept: the long side is cut, the short side whole
    assert len(tp.chosen_ids) >= 1 and len(tp.rejected_ids) >= 1
    assert tp.chosen_ids == full.chosen_ids, "the short response is kept whole"
    assert len(tp.sequence("chosen")) <= 512 and len(tp.sequence("rejected")) <= 512
    assert tp.prompt_ids == full.prompt_ids and report.truncated == 1

    from alignment.stages.dpo import pair_logps
    from alignment.rlhf.dpo_losses import dpo_sigmoid_loss, ipo_loss, simpo_loss

    batch = collate_pairs(pairs, tok.pad_token_id)
    for row_labels in batch["labels"]:
        assert (row_labels[1:] != IGNORE).sum() >= 1, "every row keeps a target"
    with torch.no_grad():
        pc, pr, lc, lr = pair_logps(tiny_path_model, batch)
    assert lc.tolist() == [10.0] and lr.tolist() == [float(len(tp.rejected_ids))]
    ref_c, ref_r = pc - 0.1, pr + 0.1
    for loss in (dpo_sigmoid_loss(pc, pr, ref_c, ref_r, 0.1), ipo_loss(pc, pr, ref_c, ref_r, 0.1, lc, lr),
                 simpo_loss(pc, pr, lc, lr, 2.0, 0.5)):
        assert torch.isfinite(loss).all(), loss


@pytest.fixture(scope="module")
def tiny_path_model():
    return load_model(resolve_model_path("tiny-llama")).eval()


def test_prompt_filling_max_length_keeps_one_token_per_response(tiny_tok):
    tok = tiny_tok
    long_prompt = _user(" ".join(["the"] * 300))
    row = {"prompt": long_prompt, "chosen": _asst("yes"), "rejected": _asst("no")}
    # A prompt budget of max_length is capped at max_length - 1: each response keeps one token, never zero.
    report = DataReport("t")
    (tp,) = load_pairs([_row(row)], tok, _cfg(max_length=64), 64, report)
    assert len(tp.prompt_ids) == 63 and len(tp.chosen_ids) == len(tp.rejected_ids) == 1
    assert tp.chosen_ids != tp.rejected_ids and not report.dropped
    # The default prompt budget (half of max_length) keeps both responses.
    report = DataReport("t")
    (tp,) = load_pairs([_row(row)], tok, _cfg(max_length=64), None, report)
    assert len(tp.prompt_ids) == 32 and tp.chosen_ids and tp.rejected_ids


def test_prompt_budget_larger_than_max_length_never_exceeds_it(tiny_tok):
    tok = tiny_tok
    row = {"prompt": _user(" ".join(["the"] * 70)), "chosen": _asst(" ".join(["yes"] * 40)),
           "rejected": _asst(" ".join(["no"] * 45))}
    report = DataReport("t")
    (tp,) = load_pairs([_row(row)], tok, _cfg(max_length=64), 128, report)  # kept, not dropped
    assert report.truncated == 1 and not report.dropped
    assert len(tp.sequence("chosen")) <= 64 and len(tp.sequence("rejected")) <= 64
    assert len(tp.prompt_ids) == 63 and len(tp.chosen_ids) == len(tp.rejected_ids) == 1  # budget capped at 63


@pytest.mark.parametrize("prompt_words", [3, 50])
def test_long_rejected_symmetric_cutoff_failures_14(tiny_tok, prompt_words):
    tok = tiny_tok
    row = {"prompt": _user(" ".join(["the"] * prompt_words)), "chosen": _asst("Short and right."),
           "rejected": _asst(" ".join(["the"] * 400))}
    full = _tokenized(tok, row, max_length=100_000)
    report = DataReport("t")
    (tp,) = load_pairs([_row(row)], tok, _cfg(max_length=64), None, report)
    assert report.truncated == 1
    assert len(tp.prompt_ids + tp.chosen_ids) <= 64
    assert len(tp.prompt_ids + tp.rejected_ids) <= 64
    assert len(tp.prompt_ids + tp.rejected_ids) == 64  # the long side fills the budget exactly
    # The prompt keeps its end (the generation prompt) when it has to be cut, and its leading BOS
    # (tiny-llama's bos_token is <|im_start|>, with which ChatML opens).
    if prompt_words == 50:
        assert full.prompt_ids[0] == tok.bos_token_id
        assert tp.prompt_ids == full.prompt_ids[:1] + full.prompt_ids[-(len(tp.prompt_ids) - 1):]
    else:
        assert tp.prompt_ids == full.prompt_ids
    assert tp.chosen_ids == full.chosen_ids[: len(tp.chosen_ids)] and tp.chosen_ids
    assert tp.rejected_ids == full.rejected_ids[: len(tp.rejected_ids)]
    # Identical prompt ids on both sides of the collated batch.
    batch = collate_pairs([tp], tok.pad_token_id)
    ids, labels = batch["input_ids"], batch["labels"]
    n_prompt = len(tp.prompt_ids)
    assert torch.equal(ids[0, :n_prompt], ids[1, :n_prompt])
    for r in range(2):
        first_target = int((labels[r] != IGNORE).nonzero()[0])
        assert first_target == n_prompt
    assert ids.shape[1] <= 64


# ---------------------------------------------------------------------------
# collate_pairs
# ---------------------------------------------------------------------------


def test_collate_pairs_layout_and_labels():
    pad = 99
    pairs = [
        TokenizedPair([1, 2, 3], [4, 5], [6], "a", margin=1.5),
        TokenizedPair([7], [8, 9, 10, 11], [12, 13], "b"),
    ]
    batch = collate_pairs(pairs, pad)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape == (4, 5)
    assert ids.tolist() == [
        [1, 2, 3, 4, 5],        # pair 0 chosen
        [7, 8, 9, 10, 11],      # pair 1 chosen
        [1, 2, 3, 6, pad],      # pair 0 rejected
        [7, 12, 13, pad, pad],  # pair 1 rejected
    ]
    I = IGNORE
    assert labels.tolist() == [
        [I, I, I, 4, 5],
        [I, 8, 9, 10, 11],
        [I, I, I, 6, I],
        [I, 12, 13, I, I],
    ]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert batch["margin"].tolist() == [1.5, 0.0] and batch["has_margin"] is True
    assert collate_pairs(pairs[1:], pad)["has_margin"] is False
    # Response tokens that happen to equal the pad id are still labelled (labels never come from pad search).
    same = collate_pairs([TokenizedPair([1], [pad, 2], [pad], "c")], pad)
    assert same["labels"].tolist() == [[I, pad, 2], [I, pad, I]]
    assert same["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_collate_real_pairs_chosen_then_rejected(tiny_tok):
    rows = [_row(CHAT_ROW, "x:1"), _row({"prompt": "Q:", "chosen": " alpha", "rejected": " beta gamma"}, "x:2")]
    pairs = load_pairs(rows, tiny_tok, _cfg(), None, DataReport("t"))
    batch = collate_pairs(pairs, tiny_tok.pad_token_id)
    B = len(pairs)
    for i, p in enumerate(pairs):
        for r, response in ((i, p.chosen_ids), (B + i, p.rejected_ids)):
            seq = p.prompt_ids + response
            n = len(seq)
            assert batch["input_ids"][r, :n].tolist() == seq
            assert batch["labels"][r, : len(p.prompt_ids)].eq(IGNORE).all()
            assert batch["labels"][r, len(p.prompt_ids) : n].tolist() == response
            assert batch["labels"][r, n:].eq(IGNORE).all() and batch["attention_mask"][r, n:].eq(0).all()
            assert batch["input_ids"][r, n:].eq(tiny_tok.pad_token_id).all()


def test_collate_pairs_packed_layout_by_hand():
    """Separate packing (the DPO layout): 2B sequences first-fit-decreasing into rows of pack_to."""
    pad = 99
    pairs = [TokenizedPair([1, 2, 3], [4, 5], [6], "a"), TokenizedPair([7], [8, 9, 10, 11], [12, 13], "b")]
    batch = collate_pairs(pairs, pad, pack_to=8)
    # Lengths c0 5, c1 5, r0 4, r1 3, placed longest first: c0 opens row 0, c1 row 1 (5 + 5 > 8), r0 row 2
    # (it fits after neither), r1 fills row 0 (5 + 3 = 8). Rows: [c0, r1], [c1], [r0].
    assert batch["input_ids"].tolist() == [
        [1, 2, 3, 4, 5, 7, 12, 13],
        [7, 8, 9, 10, 11, pad, pad, pad],
        [1, 2, 3, 6, pad, pad, pad, pad],
    ]
    assert batch["position_ids"].tolist()[0] == [0, 1, 2, 3, 4, 0, 1, 2]
    assert batch["last_position"].tolist() == [[0, 4], [1, 4], [2, 3], [0, 7]]
    assert batch["sequence_index"].tolist()[0] == [0, 0, 0, 0, 0, 3, 3, 3]
    allowed = batch["block_mask"][0, 0]
    assert allowed[5].tolist() == [False] * 5 + [True, False, False]  # r1's first token sees only itself
    assert allowed[4].tolist() == [True] * 5 + [False] * 3
    assert batch["labels"][0].tolist() == [IGNORE, IGNORE, IGNORE, 4, 5, IGNORE, 12, 13]


def test_collate_pairs_shared_prompt_layout_by_hand():
    """[prompt | chosen | rejected] per pair: each response sees the prompt and itself, never the other,
    and continues the prompt's positions."""
    pad = 99
    pairs = [TokenizedPair([1, 2, 3], [4, 5], [6], "a", margin=0.5), TokenizedPair([7], [8, 9, 10, 11], [12, 13], "b")]
    batch = collate_pairs(pairs, pad, pack_to=8, share_prompt=True)
    # Segments: pair 0 = 6 tokens, pair 1 = 7 tokens; neither fits after the other in 8: two rows.
    assert batch["input_ids"].tolist() == [[7, 8, 9, 10, 11, 12, 13], [1, 2, 3, 4, 5, 6, pad]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 1, 2], [0, 1, 2, 3, 4, 3, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 7, [1, 1, 1, 1, 1, 1, 0]]
    # last tokens: chosen 0, chosen 1, rejected 0, rejected 1
    assert batch["last_position"].tolist() == [[1, 4], [0, 4], [1, 5], [0, 6]]
    assert "labels" not in batch and batch["num_sequences"] == 4 and batch["margin"].tolist() == [0.5, 0.0]
    T, F = True, False
    assert batch["block_mask"][1, 0].tolist() == [
        [T, F, F, F, F, F, F],  # prompt
        [T, T, F, F, F, F, F],
        [T, T, T, F, F, F, F],
        [T, T, T, T, F, F, F],  # chosen
        [T, T, T, T, T, F, F],
        [T, T, T, F, F, T, F],  # rejected: prompt + itself, not the chosen tokens
        [F, F, F, F, F, F, T],  # padding sees only itself
    ]
    # A segment longer than pack_to gets a row of its own length, never a cut.
    wide = collate_pairs(pairs, pad, pack_to=4, share_prompt=True)
    assert wide["input_ids"].shape == (2, 7) and wide["attention_mask"].sum() == 13
    with pytest.raises(ValueError, match="pack_to"):
        collate_pairs(pairs, pad, share_prompt=True)


# ---------------------------------------------------------------------------
# dpo.share_prefix: one row per micro-batch, the system prompt once, each prompt once per pair
# ---------------------------------------------------------------------------


def _system_pairs(tok):
    system = [{"role": "system", "content": "You are a careful assistant who answers briefly."}]
    rows = [{"prompt": system + _user("What is 2+2?"), "chosen": _asst("4"), "rejected": _asst("It is five.")},
            {"prompt": system + _user("Name a quick animal."), "chosen": _asst("A fox, quick and brown."),
             "rejected": _asst("snail")},
            {"prompt": system + _user("hi"), "chosen": _asst("hello there"), "rejected": _asst("go away")}]
    return load_pairs([_row(r) for r in rows], tok, _cfg(max_length=256), None, DataReport("t"))


@pytest.mark.parametrize("row_tokens, rows", [(512, 1), (1, 3)], ids=["one-row", "a-row-per-pair"])
def test_shared_pairs_row_equals_padded_rows(tiny_tok, tiny_path_model, row_tokens, rows):
    from alignment.data.layout import shared_pairs_rows as _shared_pairs_row
    from alignment.stages.dpo import pair_logps

    pairs = _system_pairs(tiny_tok)
    padded = collate_pairs(pairs, tiny_tok.pad_token_id)
    shared = {**collate_pairs(pairs, tiny_tok.pad_token_id, "shared"),
              **_shared_pairs_row(pairs, tiny_tok.pad_token_id, row_tokens)}
    assert shared["input_ids"].shape[0] == rows
    assert shared["sequence_tokens"] == padded["sequence_tokens"] == int(padded["attention_mask"].sum())
    assert int(shared["attention_mask"].sum()) < (0.6 if rows == 1 else 0.8) * shared["sequence_tokens"]
    with torch.no_grad():
        got, want = pair_logps(tiny_path_model, shared), pair_logps(tiny_path_model, padded)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert got[2].tolist() == [float(len(p.chosen_ids)) for p in pairs]

    # control: a mask that lets the rejected response see the chosen one changes the rejected log-probs
    leaky = dict(shared, block_mask=torch.ones_like(shared["block_mask"]).tril())
    with torch.no_grad():
        assert (pair_logps(tiny_path_model, leaky)[1] - want[1]).abs().max() > 1e-3


def test_shared_pairs_row_gradients_equal_padded_rows(tiny_tok):
    from alignment.stages.dpo import pair_logps

    pairs = _system_pairs(tiny_tok)
    m = load_model(resolve_model_path("tiny-llama"))
    params = [p for p in m.parameters() if p.requires_grad]
    grads = []
    for layout in ("shared", None):
        m.zero_grad()
        pc, pr, _, _ = pair_logps(m, collate_pairs(pairs, tiny_tok.pad_token_id, layout))
        (pc.sum() - 0.5 * pr.sum()).backward()
        grads.append([p.grad.clone() for p in params])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
