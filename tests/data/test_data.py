"""Tests for alignment.data: loss masks, BOS/EOS handling, malformed rows, over-long rows,
packing, collation and the global batch sampler. Tokenizers only; no model is loaded."""

from __future__ import annotations

import copy
import json
import random
from collections import Counter
from pathlib import Path

import pytest

from alignment.core.config import DataConfig, TrainConfig, batch_layout
from alignment.data.layout import IGNORE, PackedRow, collate, pack_examples
from alignment.data.report import DataReport
from alignment.data.sampler import GlobalBatchSampler
from alignment.data.sft import Example, build_sft_examples, count_targets, sft_example
from alignment.data.sources import DataError, Row, read_rows
from alignment.core.models import CHATML_TEMPLATE, load_tokenizer, resolve_model_path

END = "<|im_end|>"

TWO_TURNS = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "Six, I think."},
]


# ---------------------------------------------------------------------------
# tokenizers
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_tok():
    return load_tokenizer(resolve_model_path("tiny-llama"))


@pytest.fixture(scope="session")
def smol_tok():
    return load_tokenizer(resolve_model_path("smollm2-135m"))


@pytest.fixture(params=["tiny", "smollm2"])
def tok(request):
    return request.getfixturevalue("tiny_tok" if request.param == "tiny" else "smol_tok")


@pytest.fixture(scope="session")
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


@pytest.fixture(scope="session")
def bos_tok(tiny_tok):
    """Encoder adds BOS; the chat template does not write it."""
    return _bos_adding(tiny_tok, CHATML_TEMPLATE)


@pytest.fixture(scope="session")
def gemma_like_tok(tiny_tok):
    """Encoder adds BOS and the chat template also writes it (Gemma): must still end up with one."""
    return _bos_adding(tiny_tok, "{{ bos_token }}" + CHATML_TEMPLATE)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _ex(tok, data: dict, assistant_only: bool = True) -> Example:
    ex = sft_example(Row(data, "mem:1"), tok, "auto", assistant_only=assistant_only)
    assert len(ex.input_ids) == len(ex.labels)
    assert all(type(i) is int for i in ex.input_ids), ex.input_ids
    for i, l in zip(ex.input_ids, ex.labels):
        assert l == IGNORE or l == i  # a label is the token itself or ignored, never shifted
    return ex


def _runs(ex: Example) -> list[list[int]]:
    """Contiguous runs of labelled token ids."""
    runs, cur = [], []
    for label in ex.labels:
        if label != IGNORE:
            cur.append(label)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def _decode_runs(tok, ex: Example) -> list[str]:
    return [tok.decode(r, skip_special_tokens=False) for r in _runs(ex)]


def _plain(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False).input_ids)


def _cfg(**kw) -> DataConfig:
    return DataConfig(train="unused", **kw)


# ---------------------------------------------------------------------------
# loss masks on real templates
# ---------------------------------------------------------------------------


def test_tokenizer_facts(tiny_tok, smol_tok):
    """The premises of the tests below: pad != eos on tiny, pad == eos == <|im_end|> on SmolLM2."""
    assert tiny_tok.pad_token_id != tiny_tok.eos_token_id
    assert smol_tok.pad_token_id == smol_tok.eos_token_id == smol_tok.convert_tokens_to_ids(END)
    assert smol_tok.bos_token == "<|im_start|>"
    assert smol_tok.apply_chat_template(TWO_TURNS, tokenize=False).startswith("<|im_start|>system\n")


def test_two_turn_chat_mask(tok):
    ex = _ex(tok, {"messages": TWO_TURNS})
    text = tok.apply_chat_template(TWO_TURNS, tokenize=False)
    # one tokenization of the whole render: no merged, split or duplicated boundary token
    assert ex.input_ids == _plain(tok, text)
    # exactly each assistant answer plus its end-of-turn token; no prompt, no trailing newline
    assert _decode_runs(tok, ex) == ["It is 4." + END, "Six, I think." + END]
    eot = tok.convert_tokens_to_ids(END)
    last = max(i for i, l in enumerate(ex.labels) if l != IGNORE)
    assert ex.labels[last] == eot and ex.input_ids[last] == eot
    assert ex.labels[last + 1:] == [IGNORE] * (len(ex.labels) - last - 1)  # the "\n" after it is not trained
    # BOS exactly once at the start (the template's leading <|im_start|>)
    assert ex.input_ids[0] == tok.bos_token_id
    assert ex.input_ids[1] != tok.bos_token_id
    assert ex.labels[0] == IGNORE


def test_two_turn_chat_full_loss(tok):
    ex = _ex(tok, {"messages": TWO_TURNS}, assistant_only=False)
    assert ex.labels == ex.input_ids


def test_explicit_system_prompt_not_labelled(smol_tok):
    msgs = [{"role": "system", "content": "Be terse."}] + TWO_TURNS[:2]
    ex = _ex(smol_tok, {"messages": msgs})
    text = smol_tok.apply_chat_template(msgs, tokenize=False)
    assert "You are a helpful" not in text  # the default system prompt is replaced
    assert ex.input_ids == _plain(smol_tok, text)
    assert _decode_runs(smol_tok, ex) == ["It is 4." + END]


def test_non_ascii_answer_fully_labelled(tok):
    msgs = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Héllo 😀 wörld — ok"}]
    ex = _ex(tok, {"messages": msgs})
    assert _decode_runs(tok, ex) == ["Héllo 😀 wörld — ok" + END]


# ---------------------------------------------------------------------------
# FAILURES row 15: pad == eos must not mask the real EOS
# ---------------------------------------------------------------------------


def test_pad_equals_eos_collate_keeps_real_eos(smol_tok):
    tok = smol_tok
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos
    short = _ex(tok, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]})
    long = _ex(tok, {"messages": TWO_TURNS})
    n, width = len(short.input_ids), len(long.input_ids)
    assert n < width
    batch = collate([short, long], pad_id=tok.pad_token_id)
    ids, labels, mask = batch["input_ids"].tolist(), batch["labels"].tolist(), batch["attention_mask"].tolist()
    assert [len(r) for r in ids] == [width, width]
    # the examples are unchanged inside the batch
    assert ids[0][:n] == short.input_ids and labels[0][:n] == short.labels
    assert ids[1] == long.input_ids and labels[1] == long.labels
    # only the added padding is -100 beyond the example; the padding is eos-valued but unsupervised
    assert ids[0][n:] == [eos] * (width - n)
    assert labels[0][n:] == [IGNORE] * (width - n)
    assert labels[0].count(IGNORE) == short.labels.count(IGNORE) + (width - n)
    assert mask[0] == [1] * n + [0] * (width - n) and mask[1] == [1] * width
    # the label at the real final <|im_end|> is eos, and it is the last supervised label
    final_end = max(i for i in range(n) if ids[0][i] == eos)
    assert final_end == n - 2  # followed only by the template's "\n"
    assert labels[0][final_end] == eos
    last_supervised = max(i for i, l in enumerate(labels[0]) if l != IGNORE)
    assert last_supervised == final_end
    assert sum(1 for l in labels[0] if l == eos) == 1  # one assistant turn: one supervised eos
    assert sum(1 for l in labels[1] if l == eos) == 2
    # the supervised-target count is what the examples hold, padding adds none
    assert int((batch["labels"][:, 1:] != IGNORE).sum()) == count_targets([short, long])


def test_pad_equals_eos_text_row(smol_tok):
    tok = smol_tok
    short = _ex(tok, {"text": "The sky is blue."})
    long = _ex(tok, {"text": "The quick brown fox jumps over the lazy dog, twice over."})
    assert short.input_ids[-1] == tok.eos_token_id and short.input_ids.count(tok.eos_token_id) == 1
    batch = collate([short, long], pad_id=tok.pad_token_id)
    n = len(short.input_ids)
    labels = batch["labels"][0].tolist()
    assert labels[n - 1] == tok.eos_token_id
    assert labels[:n] == short.input_ids and labels[n:] == [IGNORE] * (len(labels) - n)


# ---------------------------------------------------------------------------
# FAILURES row 12: BOS once or never, no None ids, one EOS, prompt not repeated
# ---------------------------------------------------------------------------

PC_ROW = {"prompt": "2+2=", "completion": " 4"}


@pytest.mark.parametrize("name", ["tiny_tok", "smol_tok", "nobos_tok", "bos_tok", "gemma_like_tok"])
@pytest.mark.parametrize("completion", [" 4", " 4" + END])
def test_prompt_completion_strings(request, name, completion):
    tok = request.getfixturevalue(name)
    ex = _ex(tok, {"prompt": "2+2=", "completion": completion})
    eos = tok.eos_token_id
    adds_bos = name in ("bos_tok", "gemma_like_tok")
    expected = ([tok.bos_token_id] if adds_bos else []) + _plain(tok, "2+2= 4" + END)
    assert ex.input_ids == expected
    assert None not in ex.input_ids
    # exactly one EOS, at the end, supervised
    assert ex.input_ids.count(eos) == 1 and ex.input_ids[-1] == eos and ex.labels[-1] == eos
    # BOS: once at position 0 when the tokenizer uses one, never otherwise
    if adds_bos:
        assert ex.input_ids[0] == tok.bos_token_id and ex.input_ids.count(tok.bos_token_id) == 1
    else:  # neither `<|im_start|>` (tiny/SmolLM2 BOS) nor anything else is prepended
        assert tok.convert_tokens_to_ids("<|im_start|>") not in ex.input_ids
    # prompt appears once, unlabelled; the completion is labelled
    body = ex.input_ids[1:] if adds_bos else ex.input_ids
    prompt_ids = _plain(tok, "2+2=")
    assert body[: len(prompt_ids)] == prompt_ids
    assert tok.decode(body, skip_special_tokens=False) == "2+2= 4" + END
    assert _decode_runs(tok, ex) == [" 4" + END]


@pytest.mark.parametrize("name", ["bos_tok", "gemma_like_tok", "smol_tok", "tiny_tok"])
def test_chat_single_bos(request, name):
    tok = request.getfixturevalue(name)
    ex = _ex(tok, {"messages": TWO_TURNS})
    bos = tok.bos_token_id
    text = tok.apply_chat_template(TWO_TURNS, tokenize=False)
    assert ex.input_ids[0] == bos and ex.input_ids[1] != bos
    if name in ("bos_tok", "gemma_like_tok"):  # BOS is <|endoftext|>, used nowhere else
        assert ex.input_ids.count(bos) == 1
    if name == "bos_tok":  # the template lacks BOS: one is prepended, the rest is the render
        assert ex.input_ids[1:] == _plain(tok, text)
    else:  # the render already starts with BOS: nothing is prepended
        assert ex.input_ids == _plain(tok, text)
    assert _decode_runs(tok, ex) == ["It is 4." + END, "Six, I think." + END]


def test_no_bos_tokenizer_chat(nobos_tok):
    ex = _ex(nobos_tok, {"messages": TWO_TURNS})
    assert None not in ex.input_ids
    assert ex.input_ids == _plain(nobos_tok, nobos_tok.apply_chat_template(TWO_TURNS, tokenize=False))
    assert _decode_runs(nobos_tok, ex) == ["It is 4." + END, "Six, I think." + END]


@pytest.mark.parametrize("name", ["tiny_tok", "smol_tok", "nobos_tok", "bos_tok"])
def test_text_rows(request, name):
    tok = request.getfixturevalue(name)
    eos = tok.eos_token_id
    for text in ("hello world", "hello world" + END):
        ex = _ex(tok, {"text": text})
        body = _plain(tok, "hello world" + END)
        if name == "bos_tok":
            assert ex.input_ids == [tok.bos_token_id] + body and ex.labels == [IGNORE] + body
        else:
            assert ex.input_ids == body and ex.labels == body  # every token labelled
        assert ex.input_ids.count(eos) == 1 and ex.input_ids[-1] == eos  # eos appended once


# ---------------------------------------------------------------------------
# prompt/completion as message lists
# ---------------------------------------------------------------------------


def test_prompt_completion_messages(tok):
    prompt = [{"role": "user", "content": "What is 2+2?"}]
    completion = [{"role": "assistant", "content": "It is 4."}]
    ex = _ex(tok, {"prompt": prompt, "completion": completion})
    assert ex.input_ids == _plain(tok, tok.apply_chat_template(prompt + completion, tokenize=False))
    assert _decode_runs(tok, ex) == ["It is 4." + END]


def test_prompt_completion_messages_only_completion_turns(tok):
    """An assistant turn inside the prompt is context, not a target."""
    prompt = TWO_TURNS[:3]
    completion = [TWO_TURNS[3]]
    ex = _ex(tok, {"prompt": prompt, "completion": completion})
    assert ex.input_ids == _plain(tok, tok.apply_chat_template(TWO_TURNS, tokenize=False))
    assert _decode_runs(tok, ex) == ["Six, I think." + END]
    # same conversation as a `messages` row trains both answers
    assert len(_runs(_ex(tok, {"messages": TWO_TURNS}))) == 2


# ---------------------------------------------------------------------------
# malformed rows
# ---------------------------------------------------------------------------

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
BAD_CONTENT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]}


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_field_error_names_file_line_field(tmp_path, tiny_tok):
    path = _jsonl(tmp_path / "rows.jsonl", [json.dumps(GOOD), json.dumps(BAD_CONTENT), json.dumps(GOOD)])
    rows = read_rows(str(path))
    assert [r.origin for r in rows] == [f"{path}:1", f"{path}:2", f"{path}:3"]
    with pytest.raises(DataError) as info:
        build_sft_examples(rows, tiny_tok, _cfg(), True, DataReport("t"))
    msg = str(info.value)
    assert f"{path}:2:" in msg and "messages[1].content" in msg and "string" in msg


def test_invalid_json_names_file_and_line(tmp_path):
    path = _jsonl(tmp_path / "rows.jsonl", [json.dumps(GOOD), json.dumps(BAD_CONTENT), '{"messages": [', json.dumps(GOOD)])
    with pytest.raises(DataError) as info:
        read_rows(str(path))
    msg = str(info.value)
    assert f"{path}:3:" in msg and "invalid JSON" in msg


def test_non_object_line(tmp_path):
    path = _jsonl(tmp_path / "rows.jsonl", [json.dumps(GOOD), "[1, 2]"])
    with pytest.raises(DataError, match=r":2: expected a JSON object"):
        read_rows(str(path))


@pytest.mark.parametrize(
    "row, field",
    [
        (BAD_CONTENT, "messages[1].content"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"content": "hi"}]}, "messages[0]"),
        ({"messages": []}, "messages"),
        ({"prompt": "hi", "completion": 3}, "completion"),
        ({"prompt": ["hi"], "completion": [{"role": "assistant", "content": "x"}]}, "prompt[0]"),
        ({"text": None}, "text"),
        ({"question": "hi", "answer": "x"}, "expected 'messages'"),
    ],
)
def test_malformed_row_messages(tiny_tok, row, field):
    with pytest.raises(DataError) as info:
        sft_example(Row(row, "f.jsonl:7"), tiny_tok, "auto", True)
    msg = str(info.value)
    assert msg.startswith("f.jsonl:7:") and field in msg


def test_skip_counts_bad_rows_keeps_good(tmp_path, tiny_tok):
    lines = [
        json.dumps(GOOD),
        json.dumps(BAD_CONTENT),
        json.dumps({"prompt": "2+2=", "completion": " 4"}),
        json.dumps({"question": "?"}),
        json.dumps({"text": "hello world"}),
        json.dumps(BAD_CONTENT),
    ]
    path = _jsonl(tmp_path / "rows.jsonl", lines)
    report = DataReport("train")
    examples = build_sft_examples(read_rows(str(path)), tiny_tok, _cfg(on_bad_row="skip"), True, report)
    assert [e.origin for e in examples] == [f"{path}:1", f"{path}:3", f"{path}:5"]
    assert sum(report.skipped_bad_rows.values()) == 3
    assert any("messages[1].content" in reason for reason in report.skipped_bad_rows)
    assert report.skipped_bad_rows[next(r for r in report.skipped_bad_rows if "content" in r)] == 2
    assert report.rows_read == 6 and report.examples == 3
    assert f"{path}:2:" in report.first_errors[0] and f"{path}:4:" in report.first_errors[1]
    assert report.tokens == sum(len(e.input_ids) for e in examples)
    assert report.trainable_tokens == count_targets(examples)
    assert "malformed" in report.format()


def test_skip_covers_invalid_json_line(tmp_path, tiny_tok):
    from alignment.core.recipes import load_recipe
    from alignment.stages.sft import load_sft_data

    path = _jsonl(tmp_path / "rows.jsonl", [json.dumps(GOOD)] * 2 + ['{"messages": ['] + [json.dumps(GOOD)] * 9)
    recipe = load_recipe(None, "sft", [f"output_dir={tmp_path / 'out'}", "model.name_or_path=tiny-llama",
                                       f"data.train={path}", "data.on_bad_row=skip", "data.eval=null",
                                       "train.global_batch_size=1", "train.micro_batch_size=1"])
    train, _, reports = load_sft_data(recipe, tiny_tok, is_main=False)
    assert len(train) == 11
    assert sum(reports[0].skipped_bad_rows.values()) == 1


# ---------------------------------------------------------------------------
# over-long rows
# ---------------------------------------------------------------------------

L = 24


def _chat(user: str, answer: str) -> Row:
    return Row({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]},
               f"mem:{user[:8]}")


@pytest.fixture(scope="module")
def overlong_rows(tiny_tok):
    short = _chat("hi", "ok")
    long_answer = _chat("hi", "The quick brown fox jumps over the lazy dog. " * 3)
    long_prompt = _chat("What is 17 + 25? " * 6, "42")
    lens = [len(sft_example(r, tiny_tok, "auto", True).input_ids) for r in (short, long_answer, long_prompt)]
    assert lens[0] <= L < min(lens[1:]), lens
    # the long prompt alone is longer than L: nothing of the answer survives truncation
    prompt_part = tiny_tok.apply_chat_template(long_prompt.data["messages"][:1], tokenize=False,
                                               add_generation_prompt=True)
    assert len(_plain(tiny_tok, prompt_part)) >= L
    return short, long_answer, long_prompt


def test_overlong_drop(tiny_tok, overlong_rows):
    short, long_answer, long_prompt = overlong_rows
    report = DataReport("t")
    out = build_sft_examples([short, long_answer, long_prompt], tiny_tok, _cfg(max_length=L, overlong="drop"), True,
                             report)
    assert [e.origin for e in out] == [short.origin]
    assert report.dropped == Counter({"longer than max_length": 2})
    assert report.truncated == 0 and report.examples == 1 and report.rows_read == 3


def test_overlong_truncate(tiny_tok, overlong_rows):
    short, long_answer, _ = overlong_rows
    full = sft_example(long_answer, tiny_tok, "auto", True)
    report = DataReport("t")
    out = build_sft_examples([short, long_answer], tiny_tok, _cfg(max_length=L, overlong="truncate"), True, report)
    assert len(out) == 2 and report.truncated == 1 and not report.dropped
    cut = out[1]
    assert len(cut.input_ids) == L
    assert cut.input_ids == full.input_ids[:L] and cut.labels == full.labels[:L]
    assert cut.num_trainable > 0
    assert report.tokens == len(out[0].input_ids) + L


def test_overlong_truncate_answer_cut_off_is_dropped(tiny_tok, overlong_rows):
    short, _, long_prompt = overlong_rows
    report = DataReport("t")
    out = build_sft_examples([short, long_prompt], tiny_tok, _cfg(max_length=L, overlong="truncate"), True, report)
    assert [e.origin for e in out] == [short.origin]
    assert sum(report.dropped.values()) == 1
    (reason,) = report.dropped
    assert "no trainable token" in reason
    assert report.rows_read == report.examples + sum(report.dropped.values()) + sum(report.skipped_bad_rows.values())


# ---------------------------------------------------------------------------
# packing and collation
# ---------------------------------------------------------------------------


def _synthetic(n_examples: int, max_len: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for k in range(n_examples):
        n = rng.randint(1, max_len)
        ids = [rng.randrange(4, 500) for _ in range(n)]
        labels = [IGNORE if rng.random() < 0.4 else t for t in ids]
        out.append(Example(ids, labels, f"syn:{k}"))
    out.append(Example(list(out[0].input_ids), list(out[0].labels), "dup"))  # an exact duplicate
    out.append(Example(list(range(10, 10 + max_len)), list(range(10, 10 + max_len)), "full"))  # exactly max_len
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_pack_keeps_every_token_once(seed):
    M = 64
    examples = _synthetic(60, M, seed)
    packed = pack_examples(examples, M)
    total = sum(len(e.input_ids) for e in examples)
    assert len(packed) >= -(-total // M)
    pieces = []
    for row in packed:
        assert isinstance(row, PackedRow)
        assert len(row.input_ids) == len(row.labels) == sum(row.lengths) <= M
        assert all(n >= 1 for n in row.lengths)
        start = 0
        for n in row.lengths:
            pieces.append((tuple(row.input_ids[start:start + n]), tuple(row.labels[start:start + n])))
            start += n
    # Inside a pack an example's first token is never a target (FAILURES-style cross-example leak).
    assert Counter(pieces) == Counter((tuple(e.input_ids), (IGNORE,) + tuple(e.labels[1:])) for e in examples)
    assert pack_examples(examples, M) == packed  # deterministic


def test_collate_packed_positions_and_block_mask():
    rows = [PackedRow([11, 12, 13, 21, 22], [IGNORE, 12, 13, IGNORE, 22], [3, 2]),
            PackedRow([31, 32, 33, 34], [IGNORE, 32, 33, 34], [4])]
    batch = collate(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22], [31, 32, 33, 34, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 12, 13, IGNORE, 22], [IGNORE, 32, 33, 34, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert tuple(batch["block_mask"].shape) == (2, 1, 5, 5)
    expected0 = [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],  # second example: cannot see the first
        [0, 0, 0, 1, 1],
    ]
    expected1 = [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [0, 0, 0, 0, 1],  # padding sees only itself
    ]
    assert batch["block_mask"][0, 0].int().tolist() == expected0
    assert batch["block_mask"][1, 0].int().tolist() == expected1
    assert count_targets(rows) == 6


def test_collate_packed_real_examples(tiny_tok):
    exs = [_ex(tiny_tok, {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": r}]})
           for u, r in [("hi", "hello"), ("What is 2+2?", "It is 4."), ("bye", "see you soon")]]
    packed = pack_examples(exs, 128)
    assert len(packed) == 1
    batch = collate(packed, pad_id=tiny_tok.pad_token_id)
    pos = batch["position_ids"][0].tolist()
    starts = [i for i, p in enumerate(pos) if p == 0]
    assert starts == [0, packed[0].lengths[0], packed[0].lengths[0] + packed[0].lengths[1]]
    assert sorted(packed[0].lengths) == sorted(len(e.input_ids) for e in exs)
    # boundaries fall on BOS tokens: each segment starts with <|im_start|>
    assert all(batch["input_ids"][0, s].item() == tiny_tok.bos_token_id for s in starts)
    assert int((batch["labels"][:, 1:] != IGNORE).sum()) == sum(count_targets([e]) for e in exs)


def test_packing_adds_no_cross_example_targets(tiny_tok):
    """`text` rows label their first token; packed, it is predicted from the previous example's last token."""
    exs = [_ex(tiny_tok, {"text": t}) for t in ("hello world", "the quick brown fox", "2+2=4")]
    assert all(e.labels[0] != IGNORE for e in exs)
    alone = sum(count_targets([e]) for e in exs)
    batch = collate(pack_examples(exs, 128), pad_id=tiny_tok.pad_token_id)
    assert int((batch["labels"][:, 1:] != IGNORE).sum()) == alone


# ---------------------------------------------------------------------------
# global batch sampler
# ---------------------------------------------------------------------------


def _global_batches(sampler: GlobalBatchSampler, step: int) -> list[int]:
    """The step's items in slot order: micro-batch m of rank r is slots [(m * world + r) * micro, +micro)."""
    lay = sampler.layout
    per_rank = [sampler.micro_batches(step, r) for r in range(lay.world_size)]
    out = []
    for m in range(lay.grad_accum_steps):
        for r in range(lay.world_size):
            out.extend(per_rank[r][m])
    return out


@pytest.mark.parametrize("seed", [0, 7])
def test_sampler_same_global_batch_for_any_world_size(seed):
    num_items, glob, micro = 37, 8, 2
    train = TrainConfig(global_batch_size=glob, micro_batch_size=micro)
    samplers = {w: GlobalBatchSampler(num_items, batch_layout(train, w), seed=seed) for w in (1, 2, 4)}
    assert samplers[1].steps_per_epoch == 4  # 37 // 8, the tail of 5 is dropped
    epochs = 3
    for epoch in range(epochs):
        seen: list[int] = []
        for step in range(epoch * 4, epoch * 4 + 4):
            reference = _global_batches(samplers[1], step)
            assert len(reference) == glob
            assert reference == samplers[1].epoch_order(epoch)[(step - epoch * 4) * glob:(step - epoch * 4 + 1) * glob]
            for w, sampler in samplers.items():
                per_rank = [sampler.micro_batches(step, r) for r in range(w)]
                lay = sampler.layout
                assert all(len(mb) == lay.grad_accum_steps for mb in per_rank)
                assert all(len(b) == micro for mb in per_rank for b in mb)
                union = sorted(i for mb in per_rank for b in mb for i in b)
                assert union == sorted(reference), (w, step)
                assert _global_batches(sampler, step) == reference
            seen.extend(reference)
        assert len(seen) == len(set(seen)) == 32  # no index repeats within an epoch
        assert set(seen) <= set(range(num_items))


def test_sampler_deterministic_per_seed():
    lay = batch_layout(TrainConfig(global_batch_size=8, micro_batch_size=2), 2)
    a, b, c = (GlobalBatchSampler(50, lay, seed=s) for s in (3, 3, 4))
    steps = range(0, 12)
    assert [a.micro_batches(s, r) for s in steps for r in (0, 1)] == [b.micro_batches(s, r) for s in steps for r in (0, 1)]
    assert [a.micro_batches(s, 0) for s in steps] != [c.micro_batches(s, 0) for s in steps]
    assert a.epoch_order(0) != a.epoch_order(1)  # reshuffled each epoch
    assert sorted(a.epoch_order(1)) == list(range(50))


def test_sampler_no_shuffle_and_too_few_items():
    lay = batch_layout(TrainConfig(global_batch_size=4, micro_batch_size=2), 2)
    s = GlobalBatchSampler(9, lay, seed=0, shuffle=False)
    assert s.micro_batches(0, 0) == [[0, 1]] and s.micro_batches(0, 1) == [[2, 3]]
    assert s.micro_batches(1, 1) == [[6, 7]]
    assert s.micro_batches(2, 0) == [[0, 1]]  # next epoch, item 8 dropped
    with pytest.raises(DataError, match="fewer than one global batch"):
        GlobalBatchSampler(3, lay, seed=0)


# ---------------------------------------------------------------------------
# Nothing dropped silently
# ---------------------------------------------------------------------------


def test_epoch_tail_is_counted_and_described():
    layout = batch_layout(TrainConfig(global_batch_size=8, micro_batch_size=4), 1)
    sampler = GlobalBatchSampler(20, layout, seed=0)
    assert (sampler.steps_per_epoch, sampler.tail) == (2, 4)
    text = sampler.describe()
    assert "16 of 20 training examples" in text and "4 left out of each epoch" in text
    used = {i for step in range(2) for micro in sampler.micro_batches(step, 0) for i in micro}
    assert len(used) == 16 and len(set(range(20)) - used) == 4
    assert "left out" not in GlobalBatchSampler(16, layout, seed=0).describe()


def test_column_json_with_columns_of_different_lengths_is_an_error(tmp_path):
    path = tmp_path / "cols.json"
    path.write_text(json.dumps({"prompt": ["a", "b", "c"], "completion": ["x", "y"]}))
    with pytest.raises(DataError, match=r"cols.json: .*'prompt': 3, 'completion': 2"):
        read_rows(str(path))
    path.write_text(json.dumps({"prompt": ["a", "b"], "completion": ["x", "y"]}))
    assert [r.data for r in read_rows(str(path))] == [{"prompt": "a", "completion": "x"}, {"prompt": "b", "completion": "y"}]


def test_inconsistent_template_error_names_the_turn(tiny_tok):
    tok = copy.deepcopy(tiny_tok)
    # renders the last message differently from how it renders it mid-conversation
    tok.chat_template = ("{% for m in messages %}{% if loop.last %}[{{ m['content'] }}]{% else %}"
                         "<{{ m['role'] }}>{{ m['content'] }}{% endif %}{% endfor %}")
    row = Row({"messages": TWO_TURNS}, "sft.jsonl:9")
    with pytest.raises(DataError, match=r"sft.jsonl:9: .*\(turn 1\)") as err:
        sft_example(row, tok, "auto", True)
    assert "{i}" not in str(err.value)


def test_rows_under_keeps_order_and_cap():
    from alignment.data.layout import rows_under

    assert rows_under([5, 5, 5], 2, 100) == [[0, 1, 2]]
    assert rows_under([5, 5, 5], 2, 12) == [[0, 1], [2]]
    assert rows_under([50, 5, 5], 2, 12) == [[0], [1, 2]]  # too long for any row: a row of its own
    assert rows_under([5, 5], 2, 1) == [[0], [1]]
    # just over the cap: two balanced rows, not a full one and a nearly empty one padded to its width
    rows = rows_under([30] * 17, 24, 512)
    assert [len(r) for r in rows] == [9, 8] and sum(rows, []) == list(range(17))
    assert rows_under([30] * 16, 24, 512) == [list(range(16))]
