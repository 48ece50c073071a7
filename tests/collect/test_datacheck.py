"""`align data check`: every finding counted on a file built to hold each problem once."""

from __future__ import annotations

import json

from helpers import run_cli


def test_data_check_finds_each_problem(tmp_path):
    rows = [
        {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "five, I think"},           # chosen shorter
        {"prompt": "what is 2 + 2", "chosen": "It is 4.", "rejected": "5"},                 # near dup of row 1
        {"prompt": "What is 2 * 2?", "chosen": "4", "rejected": "8"},                       # not a near dup: * != +
        {"prompt": "Name a colour.", "chosen": "Blue", "rejected": "Blue"},                 # identical
        {"prompt": "Name a colour.", "chosen": "Red", "rejected": "A colour is a colour"},  # exact dup prompt
    ]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    eval_file = tmp_path / "eval.jsonl"
    # an eval prompt set (prompt rows only, as builtin:prompts_eval): leakage is still found
    eval_file.write_text(json.dumps({"prompt": "WHAT IS 2 * 2 ?", "gold": {"expected": 4}}) + "\n")
    out = tmp_path / "report.json"
    result = run_cli(["data", "check", str(train), "--eval", str(eval_file), "--out", str(out)]).check()
    report = json.loads(out.read_text())
    assert report["rows"] == 6 and report["shapes"] == {"explicit": 5, "malformed": 1}
    assert report["malformed"]["count"] == 1 and "train.jsonl:6" in report["malformed"]["examples"][0]
    assert report["chosen_equals_rejected"]["count"] == 1
    assert report["duplicate_prompts"]["exact_groups"] == 1  # "Name a colour." twice
    assert report["duplicate_prompts"]["near_groups"] == 1    # 2 + 2 twice; 2 * 2 apart
    assert report["leakage"]["shared_prompts"] == 1
    bias = report["length_bias"]
    # the 4 usable pairs by hand: row 1 chosen shorter, row 2 longer, row 3 equal ("4" / "8"), row 5 shorter
    assert bias["pairs"] == 4 and bias["chosen_longer_share"] == 0.25
    assert bias["shorter_answer_wins_accuracy"] == (1 + 0 + 0.5 + 1) / 4
    assert "leakage: 1 prompts" in result.output
