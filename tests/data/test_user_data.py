"""A user's own data, as users bring it (issue: "your own model and data"): every file and folder shape that
`datasets` writes, every TRL dataset type in its standard and conversational form for each stage that takes it,
errors that name the file, the line and the field, and held-out evaluation on the user's own rows.

Every file here is written by `datasets` itself (to_json, to_parquet, to_csv, save_to_disk)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from alignment.core.models import load_tokenizer, resolve_model_path
from alignment.core.recipes import load_recipe
from alignment.data.preference import load_pairs
from alignment.data.prompts import load_prompts
from alignment.data.report import DataReport
from alignment.data.sft import build_sft_examples
from alignment.data.sources import DataError, read_rows, read_splits
from helpers import REPO, align_cache  # noqa: F401

Q, A, B = "What is 2+2?", "It is 4.", "It is 5."


def conv(role: str, text: str) -> list[dict]:
    return [{"role": role, "content": text}]


# Each TRL dataset type, standard (strings) and conversational (message lists): 4 rows a shape.
SHAPES = {
    "lm-standard": {"text": f"{Q} {A}"},
    "lm-conversational": {"messages": conv("user", Q) + conv("assistant", A)},
    "prompt-completion-standard": {"prompt": Q, "completion": A},
    "prompt-completion-conversational": {"prompt": conv("user", Q), "completion": conv("assistant", A)},
    "prompt-only-standard": {"prompt": Q},
    "prompt-only-conversational": {"prompt": conv("user", Q)},
    "preference-explicit-standard": {"prompt": Q, "chosen": A, "rejected": B},
    "preference-explicit-conversational": {"prompt": conv("user", Q), "chosen": conv("assistant", A),
                                           "rejected": conv("assistant", B)},
    "preference-implicit-standard": {"chosen": f"{Q} {A}", "rejected": f"{Q} {B}"},
    "preference-implicit-conversational": {"chosen": conv("user", Q) + conv("assistant", A),
                                           "rejected": conv("user", Q) + conv("assistant", B)},
}
STAGE_SHAPES = {
    "sft": ["lm-standard", "lm-conversational", "prompt-completion-standard", "prompt-completion-conversational"],
    "rm": [s for s in SHAPES if s.startswith("preference")],
    "dpo": [s for s in SHAPES if s.startswith("preference")],
    "ppo": ["prompt-only-standard", "prompt-only-conversational", "prompt-completion-standard",
            "preference-explicit-conversational"],
}


def rows_of(shape: str, n: int = 4) -> list[dict]:
    rows = []
    for i in range(n):  # distinct rows: the answers differ by a number
        row = json.loads(json.dumps(SHAPES[shape]).replace("2+2", f"2+{i}"))
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def tok(align_cache):
    return load_tokenizer(resolve_model_path("tiny-llama"))


class DataCfg:
    max_length, format, on_bad_row = 128, "auto", "error"


@pytest.mark.parametrize("stage,shape", [(stage, shape) for stage, shapes in STAGE_SHAPES.items() for shape in shapes])
def test_every_trl_shape_loads_for_each_stage_that_takes_it(tmp_path, tok, stage, shape):
    path = tmp_path / "data.jsonl"
    datasets.Dataset.from_list(rows_of(shape)).to_json(str(path))
    rows = read_rows(str(path))
    report = DataReport("train")
    if stage == "sft":
        items = build_sft_examples(rows, tok, DataCfg, assistant_only=True, report=report)
        assert len(items) == 4 and all(any(t != -100 for t in it.labels) for it in items)
    elif stage in ("rm", "dpo"):
        pairs = load_pairs(rows, tok, DataCfg, None, report, reward_model=stage == "rm")
        assert len(pairs) == 4
        assert all(p.chosen_ids != p.rejected_ids and p.prompt_ids for p in pairs)
        first = pairs[0]
        assert tok.decode(first.chosen_ids).find("4") >= 0 or tok.decode(first.chosen_ids).find("It is") >= 0
    else:
        prompts = load_prompts(rows, tok, 96, report, "error")
        assert len(prompts.ids) == 4 and all(ids for ids in prompts.ids)
    assert report.examples == 4 and not report.dropped and not report.skipped_bad_rows


def test_an_implicit_prompt_in_strings_is_the_text_both_start_with(tok):
    from alignment.data.preference import to_pair
    from alignment.data.sources import Row

    pair = to_pair(Row({"chosen": "The sky is blue.", "rejected": "The sky is green."}, "x.jsonl:1"))
    assert (pair.prompt, pair.chosen, pair.rejected) == ("The sky is", " blue.", " green.")


@pytest.mark.parametrize("writer", ["json-lines-in-.json", "parquet", "csv", "save_to_disk", "save_to_disk-dict",
                                    "relative-save_to_disk", "jsonl-without-extension"])
def test_every_file_shape_datasets_writes_is_read(tmp_path, monkeypatch, writer):
    rows = rows_of("preference-explicit-standard")
    data = datasets.Dataset.from_list(rows)
    if writer == "json-lines-in-.json":
        target = tmp_path / "x.json"
        data.to_json(str(target))  # JSON lines, though the extension says JSON
    elif writer == "parquet":
        target = tmp_path / "x.parquet"
        data.to_parquet(str(target))
    elif writer == "csv":
        target = tmp_path / "x.csv"
        data.to_csv(str(target), index=False)
    elif writer == "save_to_disk":
        target = tmp_path / "folder"
        data.save_to_disk(str(target))
    elif writer == "save_to_disk-dict":
        target = tmp_path / "dict"
        datasets.DatasetDict({"train": data, "test": data.select([0])}).save_to_disk(str(target))
    elif writer == "relative-save_to_disk":
        data.save_to_disk(str(tmp_path / "rel"))
        monkeypatch.chdir(tmp_path)
        target = Path("rel")
    else:
        target = tmp_path / "x.data"
        data.to_json(str(target))
    got = read_rows(str(target))
    assert [r.data["chosen"] for r in got] == [r["chosen"] for r in rows]
    if writer == "save_to_disk-dict":
        assert len(read_rows(str(target), split="test")) == 1
        with pytest.raises(DataError, match="without a split 'validation'; it has train, test"):
            read_rows(str(target), split="validation")


def test_errors_name_the_file_the_line_and_the_field(tmp_path, tok):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": Q, "chosen": A, "rejected": B}) + "\n" + json.dumps({"prompt": Q, "chosen": A})
                    + "\n")
    with pytest.raises(DataError) as info:
        load_pairs(read_rows(str(path)), tok, DataCfg, None, DataReport("train"))
    assert str(info.value) == f"{path}:2: field 'rejected' is missing (the row has 'chosen'; fields: ['chosen', 'prompt'])"

    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"question": Q, "answer": A}) + "\n")
    with pytest.raises(DataError) as info:
        build_sft_examples(read_rows(str(odd)), tok, DataCfg, True, DataReport("train"))
    message = str(info.value)
    assert message.startswith(f"{odd}:1: cannot tell the row's shape from its fields ['answer', 'question']")
    for example in ('{"messages": [', '{"prompt": "What is 2+2?", "completion": "4"}', '{"text": '):
        assert example in message


def test_unpaired_rows_given_to_dpo_say_which_stage_takes_them(tmp_path, tok):
    path = tmp_path / "thumbs.jsonl"
    path.write_text(json.dumps({"prompt": Q, "completion": A, "label": True}) + "\n")
    with pytest.raises(DataError, match="this is an unpaired preference row: align kto trains on it"):
        load_pairs(read_rows(str(path)), tok, DataCfg, None, DataReport("train"))


def test_a_missing_local_file_is_not_looked_up_on_the_hub(tmp_path):
    with pytest.raises(DataError, match="data file not found: runs/nope/pairs.jsonl \\(relative to"):
        read_rows("runs/nope/pairs.jsonl")


def test_evaluation_follows_the_users_data(tmp_path, align_cache):
    """A recipe whose data.train is replaced by the user's file evaluates on a held-out split of that file, named
    in the report, and scores no gold on the built-in task; built-in data keeps its built-in eval set."""
    mine = tmp_path / "my_pairs.jsonl"
    datasets.Dataset.from_list(rows_of("preference-explicit-standard", 40)).to_json(str(mine))
    recipe = load_recipe(REPO / "configs/tiny/dpo.yaml", "dpo", [f"data.train={mine}"])
    assert recipe.data.eval is None and recipe.data.eval_fraction == 0.1
    rows, eval_rows = read_splits(recipe.data, recipe.seed)
    assert (len(rows), len(eval_rows)) == (36, 4)
    assert eval_rows.described == f"10% of {mine}, seed 0: 4 rows"
    assert rows.described == f"{mine} less the held-out 10%: 36 rows"

    builtin = load_recipe(REPO / "configs/tiny/dpo.yaml", "dpo")
    assert builtin.data.eval == "builtin:prefs_eval" and not builtin.data.eval_fraction
    gold = load_recipe(REPO / "configs/smollm2/sft.yaml", "sft", [f"data.train={mine}"])
    assert gold.sft.gold_eval.prompts is None
    assert load_recipe(REPO / "configs/smollm2/sft.yaml", "sft").sft.gold_eval.prompts == "builtin:prompts_eval"
    named = load_recipe(REPO / "configs/smollm2/sft.yaml", "sft", [f"data.train={mine}",
                                                                  "sft.gold_eval.prompts=builtin:prompts_eval"])
    assert named.sft.gold_eval.prompts == "builtin:prompts_eval"  # asked for by name: kept


def test_dropped_rows_are_located(tmp_path, tok):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"prompt": Q, "chosen": A, "rejected": B},
                                                           {"prompt": Q, "chosen": A, "rejected": A},
                                                           {"prompt": Q, "chosen": "", "rejected": B}]))
    report = DataReport("train", "pairs.jsonl: 3 rows")
    load_pairs(read_rows(str(path)), tok, DataCfg, None, report)
    assert [(x["reason"], x["origin"]) for x in report.left_out] == [
        ("chosen identical to rejected", f"{path}:2"), ("empty response", f"{path}:3")]
    text = report.format()
    assert f"chosen identical to rejected: {path}:2" in text and f"empty response: {path}:3" in text
    assert text.startswith("data report [train] from pairs.jsonl: 3 rows: rows read 3, kept 1")
