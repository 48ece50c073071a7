"""report.html from stage outputs: the score table carries summary.json's numbers, curves come from
metrics.jsonl (non-finite values left out, not drawn as zeros), samples line up by prompt, text is escaped."""

from __future__ import annotations

import json
import re

from alignment.evaluate.report import line_chart, series, write_report


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_series_skips_rows_without_the_key_and_non_finite_values():
    rows = [{"step": 1, "loss": 2.0}, {"step": 2}, {"step": 3, "loss": float("nan")}, {"step": 4, "loss": 1.0}]
    assert series(rows, "loss") == [(1.0, 2.0), (4.0, 1.0)]


def test_line_chart_maps_points_inside_the_frame():
    svg = line_chart("loss", {"loss": [(0, 0.0), (10, 1.0)], "empty": []})
    points = re.search(r' points="([^"]+)"', svg).group(1).split()
    (x0, y0), (x1, y1) = [tuple(map(float, p.split(","))) for p in points]
    assert x0 < x1 and y0 > y1  # left to right, rising (SVG's y grows downward)
    assert 0 <= min(x0, x1) and max(x0, x1) <= 360 and 0 <= min(y0, y1) and max(y0, y1) <= 200
    assert "empty" not in svg and line_chart("nothing", {"a": []}) == ""


def test_report_table_curves_reward_kl_and_samples(tmp_path):
    stages = {name: tmp_path / name for name in ("sft", "rm", "ppo")}
    _write(stages["sft"] / "metrics.jsonl", [{"step": 0, "gold/score_before": 0.1}, {"step": 1, "loss": 2.0},
                                             {"step": 2, "loss": 1.5, "eval/loss": 1.7}])
    _write(stages["rm"] / "metrics.jsonl", [{"step": 1, "loss": 0.7, "eval/accuracy": 0.6}])
    _write(stages["ppo"] / "metrics.jsonl", [{"step": i, "objective/scores": 0.2 * i, "objective/kl": 0.01 * i}
                                             for i in (1, 2, 3)])
    sample = {"id": "p1", "prompt": "What is 2+2?", "score": 1.0}
    _write(stages["sft"] / "gold_samples_before.jsonl", [{**sample, "response": "<script>x</script>", "score": 0.0}])
    _write(stages["sft"] / "gold_samples_after.jsonl", [{**sample, "response": "4"}])
    _write(stages["ppo"] / "gold_samples_after.jsonl", [{**sample, "response": "4"}, {**sample, "id": "p2",
                                                                                     "response": "5"}])
    summary = {"gold": {"base": 0.1, "sft": 0.45, "ppo": 0.5}, "rm_accuracy": 0.6}
    page = write_report(tmp_path, stages, summary).read_text()
    cells = dict(re.findall(r'data-key="([^"]+)">([^<]+)<', page))
    assert cells == {"gold.base": "0.100", "gold.sft": "0.450", "gold.ppo": "0.500", "rm_accuracy": "0.600"}
    assert 'data-name="eval/loss" data-points="1"' in page and 'data-name="loss" data-points="2"' in page
    assert 'id="reward-kl"' in page and 'data-name="objective/scores" data-points="3"' in page
    assert "<script>" not in page and "&lt;script&gt;" in page
    # Only the prompt every stage answered is shown, one column per stage (rm has no samples: no column).
    samples = page[page.index('id="samples"'):]
    assert samples.count("<tr>") == 2 and "<th>base</th><th>sft</th><th>ppo</th>" in samples
    assert "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # self-contained
