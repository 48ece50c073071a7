"""report.html from stage outputs: the score table carries summary.json's numbers (and says what it lacks),
curves come from metrics.jsonl (non-finite values left out, not drawn as zeros) as matplotlib plots with ticks,
gridlines and legends, samples line up by prompt, conversations show as turns, text is escaped; and in a real
browser every plot's ticks and legend are visible, none of its text clipped.

ALIGN_SCREENSHOTS=DIR keeps the browser test's screenshots there (docs/screenshots/ holds the committed ones)."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest

from alignment.evaluate.report import (line_chart, series, smooth, split_by_scale, stage_charts, write_eval_report,
                                       write_report)


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _series_group(svg: str, index: int = 0, kind: str = "series") -> str:
    start = svg.index(f'class="{kind}"', svg.index(f"-{kind}-{index}\""))
    return svg[start:svg.index("</g>", start)]


def _path_points(group: str) -> list[tuple[float, float]]:
    d = re.search(r'<path d="([^"]+)"', group).group(1)
    nums = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", d)]
    return list(zip(nums[::2], nums[1::2]))


def test_series_skips_rows_without_the_key_and_non_finite_values():
    rows = [{"step": 1, "loss": 2.0}, {"step": 2}, {"step": 3, "loss": float("nan")}, {"step": 4, "loss": 1.0}]
    assert series(rows, "loss") == [(1.0, 2.0), (4.0, 1.0)]


def test_line_chart_maps_points_inside_the_frame():
    svg = line_chart("loss", {"loss": [(0, 0.0), (10, 1.0)], "empty": []})
    width, height = map(float, re.search(r'viewBox="0 0 ([\d.]+) ([\d.]+)"', svg).groups())
    (x0, y0), (x1, y1) = _path_points(_series_group(svg))
    assert x0 < x1 and y0 > y1  # left to right, rising (SVG's y grows downward)
    assert 0 <= min(x0, x1) and max(x0, x1) <= width and 0 <= min(y0, y1) and max(y0, y1) <= height
    assert 'data-name="loss" data-points="2"' in svg
    assert "empty" not in svg and line_chart("nothing", {"a": []}) == ""


def test_chart_has_ticks_gridlines_a_legend_with_swatches_and_readable_negative_ticks():
    svg = line_chart("policy loss", {"loss/policy": [(1, -0.00761), (2, 0.004), (3, -0.002)],
                                     "eval/loss": [(1, -0.005), (3, 0.001)]})
    for axis in ("x", "y"):
        ticks = re.findall(rf'class="tick {axis}">(.*?)</text>', svg, flags=re.S)
        assert len(ticks) >= 3, axis
        assert len(re.findall(rf'class="tick {axis}">\s*<g[^>]*>\s*<path d="[^"]+"\s+clip-path', svg)) >= 3  # gridlines
    labels = re.findall(r"<text[^>]*>([^<]+)</text>", svg)
    assert any(label.startswith("\u2212") for label in labels), labels  # a negative tick, its sign kept
    legend = svg[svg.index('class="legend"'):]
    assert "loss/policy" in legend and "eval/loss" in legend
    assert "stroke: #1f77b4" in legend and "stroke: #d62728" in legend  # a swatch in each series' colour
    assert 'aria-label="policy loss"' in svg and "<script" not in svg and "http" not in svg


def test_sparse_series_get_markers_noisy_ones_are_smoothed_over_the_raw_ones():
    noisy = [(i, math.sin(i) + i / 10) for i in range(60)]
    svg = line_chart("loss", {"loss": noisy, "eval/loss": [(0, 1.0), (30, 3.0), (59, 5.0)]})
    assert 'data-name="loss" data-points="60"' in svg and "loss (smoothed)" in svg
    raw = _series_group(svg, 0, "raw")
    assert "stroke-opacity: 0.25" in raw  # the raw series faint behind
    assert "<use" in _series_group(svg, 1) and "<use" not in _series_group(svg, 0)  # markers on the 3-point series
    plain = line_chart("loss", {"loss": noisy}, smoothing=None)
    assert 'class="raw"' not in plain and "(smoothed)" not in plain
    assert smooth([1.0, 1.0, 1.0], 0.9) == pytest.approx([1.0, 1.0, 1.0])  # no start-up bias


def test_each_scale_gets_its_own_axis_and_the_schedule_is_plotted():
    groups = split_by_scale({"a": [(0, 0.01)], "b": [(0, 20.0)], "c": [(0, 0.02)]})
    assert [list(g) for g in groups] == [["a", "c"], ["b"]]
    rows = [{"step": i, "loss/policy": 0.01 * (-1) ** i, "loss/value": 12.0 + i, "train/lr": 1e-5 * i,
             "train/grad_norm": 1.0 + i % 3, "objective/scores": 0.5, "objective/kl": 0.01 * i} for i in range(1, 6)]
    titles = [re.search(r'aria-label="([^"]+)"', c).group(1) for c in stage_charts("ppo", rows)]
    assert "policy loss" in titles and "value loss" in titles  # never one axis for both
    assert "learning rate" in titles and "gradient norm" in titles
    mixed = stage_charts("sft", [{"step": i, "loss": 2.0, "eval/loss": 400.0} for i in range(3)])
    assert len(mixed) == 2  # listed together, split because their scales differ


def _stages(tmp_path, ppo_steps=3):
    stages = {name: tmp_path / name for name in ("sft", "rm", "ppo")}
    _write(stages["sft"] / "metrics.jsonl", [{"step": 0, "gold/score_before": 0.1}, {"step": 1, "loss": 2.0},
                                             {"step": 2, "loss": 1.5, "eval/loss": 1.7, "train/lr": 1e-4,
                                              "train/grad_norm": 3.0}])
    _write(stages["rm"] / "metrics.jsonl", [{"step": 1, "loss": 0.7, "eval/accuracy": 0.6}])
    _write(stages["ppo"] / "metrics.jsonl", [{"step": i, "objective/scores": 0.2 * i + 0.1 * math.sin(i),
                                              "objective/kl": 0.01 * i, "loss/policy": -0.00761 * math.cos(i),
                                              "loss/value": 3.0 / i, "train/lr": 1e-6}
                                             for i in range(1, ppo_steps + 1)])
    return stages


def test_report_table_curves_reward_kl_and_samples(tmp_path):
    stages = _stages(tmp_path)
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
    assert 'class="arrow"' in page[page.index('id="reward-kl"'):]  # the iterations' order
    assert "<script>" not in page and "&lt;script&gt;" in page
    # Only the prompt every stage answered is shown, one column per stage (rm has no samples: no column).
    samples = page[page.index('id="samples"'):]
    assert samples.count("<tr>") == 2 and "<th>base</th><th>sft</th><th>ppo</th>" in samples
    assert "http" not in page  # self-contained
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids))  # each plot's ids its own


def test_score_table_says_what_it_lacks_and_grows_a_column_per_family(tmp_path):
    # a tiny pipeline: no gold evaluation anywhere, a reward model
    stages = {name: tmp_path / name for name in ("sft", "rm", "dpo")}
    for stage in stages.values():
        _write(stage / "metrics.jsonl", [{"step": 1, "loss": 1.0}])
    page = write_report(tmp_path, stages, {"gold": {"sft": None, "dpo": None}, "rm_accuracy": 0.64}).read_text()
    scores = page[page.index('id="scores"'):page.index("</section>")]
    assert "No held-out gold score" in scores and "sft, dpo ran without it" in scores
    assert "held-out gold score</th>" not in scores and 'data-key="rm_accuracy">0.640' in scores
    assert "held-out pairwise accuracy" in scores
    # no reward model either: said, not an empty table
    page = write_report(tmp_path, {"sft": stages["sft"]}, {"gold": {"sft": None}, "rm_accuracy": None}).read_text()
    assert "No reward model in this run" in page and "<tbody></tbody>" not in page
    # per-family gold scores: from the stages' last gold/<family> metrics ...
    _write(stages["sft"] / "metrics.jsonl", [{"step": 0, "gold/score_before": 0.1}, {"step": 2, "gold/score": 0.4,
                                              "gold/arithmetic": 0.5, "gold/arithmetic_se": 0.1, "gold/arithmetic_n": 8,
                                              "gold/units": 0.3, "gold/exact": 0.3}])
    summary = {"gold": {"base": 0.1, "sft": 0.4, "dpo": None}, "rm_accuracy": 0.64}
    page = write_report(tmp_path, stages, summary).read_text()
    head = page[page.index('id="gold-scores"'):page.index("</thead>")]
    assert re.findall(r"<th[^>]*>([^<]+)</th>", head) == ["after stage", "gold score (all prompts)", "arithmetic", "units"]
    cells = dict(re.findall(r'data-key="([^"]+)">([^<]+)<', page))
    assert cells["gold.sft.arithmetic"] == "0.500" and cells["gold.sft.units"] == "0.300" and "gold.dpo" not in cells
    assert "Not measured for dpo" in page
    # ... or summary.json's families table, either way round
    for families in ({"base": {"units": 0.2}, "sft": {"units": 0.6, "words": 0.1}},
                     {"units": {"base": 0.2, "sft": 0.6}, "words": {"sft": 0.1}}):
        page = write_report(tmp_path, stages, {**summary, "families": families}).read_text()
        cells = dict(re.findall(r'data-key="([^"]+)">([^<]+)<', page))
        assert {k: v for k, v in cells.items() if k.count(".") == 2} == {
            "gold.base.units": "0.200", "gold.sft.units": "0.600", "gold.sft.words": "0.100"}


def test_eval_report_shows_conversations_as_turns_never_as_reprs(tmp_path):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2? <b>bold</b>"}]
    result = {"reward_model": "rm", "rm/accuracy": 0.75, "dropped": {"identical responses": 2},
              "samples": [{"prompt": prompt, "chosen": [{"role": "assistant", "content": "4"}],
                           "rejected": "5", "reward_chosen": 1.25, "reward_rejected": -0.5}]}
    page = write_eval_report(tmp_path, result).read_text()
    assert "{'role'" not in page and "[{" not in page
    assert page.count('class="turn role-') == 3 and '<span class="role">system</span>' in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and 'data-key="rm/accuracy">0.75<' in page
    assert "identical responses" in page and ">1.25<" in page


@pytest.mark.slow
def test_plots_ticks_and_legends_are_visible_in_a_real_browser(tmp_path):
    """Chromium draws every plot of a report with many-step curves, 3-point evaluations, negative values, the
    learning rate and a 40-iteration reward-KL path: ticks and legends present and visible, nothing clipped."""
    from browser import check_report_in_browser

    stages = _stages(tmp_path, ppo_steps=40)
    rows = [{"step": i, "loss": 2.0 / (1 + i) + 0.1 * math.sin(3 * i), "train/lr": 1e-4 * min(1, i / 5),
             "train/grad_norm": 1.0 + 0.5 * math.cos(i)} for i in range(1, 61)]
    rows += [{"step": s, "eval/loss": v} for s, v in ((20, 0.4), (40, 0.3), (60, 0.28))]
    _write(stages["sft"] / "metrics.jsonl", [{"step": 0, "gold/score_before": 0.1}, *rows,
                                             {"step": 60, "gold/score": 0.4, "gold/exact": 0.3}])
    summary = {"gold": {"base": 0.1, "sft": 0.4, "ppo": 0.5}, "rm_accuracy": 0.6}
    shots = Path(os.environ.get("ALIGN_SCREENSHOTS") or tmp_path)
    seen = check_report_in_browser(write_report(tmp_path, stages, summary), summary, shots / "report-plots.png")
    titles = {p["label"] for p in seen["plots"]}
    assert {"loss", "learning rate", "gradient norm", "policy loss", "value loss",
            "reward against KL over RL iterations"} <= titles
    assert seen["reward_kl"] == 1
    loss = next(p for p in seen["plots"] if p["label"] == "loss" and any(s["points"] == 60 for s in p["series"]))
    assert any(s["name"] == "eval/loss" and s["markers"] == 3 for s in loss["series"])
    policy = next(p for p in seen["plots"] if p["label"] == "policy loss")
    assert any(t["text"].startswith("\u2212") and t["visible"] for t in policy["yticks"])  # "-0.006" whole
