"""output_dir/report.html: one self-contained page per pipeline (no network, no scripts, plots as inline SVG).

What it shows, top to bottom:
1. the score table: held-out gold score after each stage (base = the model SFT started from), and the
   reward model's held-out accuracy; the same numbers as summary.json,
2. training curves of every stage, read from its metrics.jsonl,
3. reward against KL over the online-RL iterations (the trade-off RLHF buys),
4. sample generations side by side: the same held-out prompts answered by the policy after each stage,
   with their gold scores (each stage's gold_samples_*.jsonl).

Each plot is an <svg class="plot"> whose <polyline class="series"> elements carry the data points, so
a browser test can check that they render with non-zero size.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

# Curves worth a look per stage, in order; a key absent from a run's metrics is left out.
CURVES = {
    "sft": [("loss", "eval/loss"), ("train/tokens_per_s",)],
    "rm": [("loss",), ("rewards/accuracies", "eval/accuracy")],
    "dpo": [("loss", "eval/loss"), ("rewards/accuracies", "eval/rewards/accuracies"), ("rewards/margins",)],
    "ppo": [("objective/scores", "objective/rlhf_reward"), ("objective/kl",), ("response/length",),
            ("loss/policy", "loss/value"), ("objective/entropy",)],
}
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")
WIDTH, HEIGHT, PAD = 360, 200, 36


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(rows: list[dict], key: str, x_key: str = "step") -> list[tuple[float, float]]:
    """(x, y) points of one metric, skipping rows without it and non-finite values."""
    points = []
    for row in rows:
        x, y = row.get(x_key), row.get(key)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and math.isfinite(x) and math.isfinite(y):
            points.append((float(x), float(y)))
    return points


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def line_chart(title: str, lines: dict[str, list[tuple[float, float]]], x_label: str = "step",
               markers: bool = False) -> str:
    """An inline SVG chart: one polyline per named series, axes with their ranges, a legend."""
    lines = {k: v for k, v in lines.items() if v}
    if not lines:
        return ""
    xs = [x for pts in lines.values() for x, _ in pts]
    ys = [y for pts in lines.values() for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - abs(y0) * 0.1 - 1e-3, y1 + abs(y1) * 0.1 + 1e-3

    def sx(x):
        return PAD + (x - x0) / (x1 - x0) * (WIDTH - 2 * PAD)

    def sy(y):
        return HEIGHT - PAD + (y - y0) / (y1 - y0) * (2 * PAD - HEIGHT)

    parts = [f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
             f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{html.escape(title)}">',
             f'<text x="{WIDTH / 2}" y="14" text-anchor="middle" class="title">{html.escape(title)}</text>',
             f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}" class="axis"/>',
             f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{HEIGHT - PAD}" class="axis"/>',
             f'<text x="{PAD}" y="{HEIGHT - PAD + 14}" class="tick">{_fmt(x0)}</text>',
             f'<text x="{WIDTH - PAD}" y="{HEIGHT - PAD + 14}" text-anchor="end" class="tick">{_fmt(x1)}</text>',
             f'<text x="{WIDTH / 2}" y="{HEIGHT - 6}" text-anchor="middle" class="tick">{html.escape(x_label)}</text>',
             f'<text x="{PAD - 4}" y="{HEIGHT - PAD}" text-anchor="end" class="tick">{_fmt(y0)}</text>',
             f'<text x="{PAD - 4}" y="{PAD + 4}" text-anchor="end" class="tick">{_fmt(y1)}</text>']
    for i, (name, pts) in enumerate(lines.items()):
        colour = COLOURS[i % len(COLOURS)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline class="series" data-name="{html.escape(name)}" data-points="{len(pts)}" '
                     f'fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}"/>')
        if markers or len(set(pts)) == 1:
            parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colour}"/>' for x, y in pts]
        parts.append(f'<text x="{WIDTH - PAD}" y="{PAD + 12 * i}" text-anchor="end" fill="{colour}" '
                     f'class="legend">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _read_samples(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _score_table(summary: dict) -> str:
    gold = summary.get("gold", {})
    rows = "".join(f'<tr><td>{html.escape(stage)}</td><td class="num" data-key="gold.{html.escape(stage)}">'
                   f'{value:.3f}</td></tr>' for stage, value in gold.items() if value is not None)
    if summary.get("rm_accuracy") is not None:
        rows += (f'<tr><td>reward model accuracy</td><td class="num" data-key="rm_accuracy">'
                 f'{summary["rm_accuracy"]:.3f}</td></tr>')
    return (f'<table id="scores"><thead><tr><th>after stage</th><th>held-out gold score</th></tr></thead>'
            f'<tbody>{rows}</tbody></table>')


def _samples_table(columns: dict[str, list[dict]], limit: int = 8) -> str:
    columns = {k: v for k, v in columns.items() if v}
    if not columns:
        return "<p>No sample generations were recorded.</p>"
    by_id = {name: {s["id"]: s for s in rows} for name, rows in columns.items()}
    first = next(iter(columns.values()))
    ids = [s["id"] for s in first if all(s["id"] in b for b in by_id.values())][:limit]
    head = "".join(f"<th>{html.escape(n)}</th>" for n in columns)
    body = []
    for sid in ids:
        cells = "".join(f'<td><pre>{html.escape(by_id[n][sid]["response"])}</pre>'
                        f'<span class="score">gold {by_id[n][sid]["score"]:.2f}</span></td>' for n in columns)
        body.append(f'<tr><td><pre>{html.escape(by_id[next(iter(columns))][sid]["prompt"])}</pre></td>{cells}</tr>')
    return f'<table id="samples"><thead><tr><th>prompt</th>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


STYLE = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}pre{margin:0;white-space:pre-wrap;max-width:320px}
.plots{display:flex;flex-wrap:wrap;gap:12px}svg.plot{border:1px solid #eee;background:#fff}
.axis{stroke:#888}.tick,.legend{font-size:10px;fill:#555}.legend{font-weight:600}.title{font-size:12px}
.score{font-size:11px;color:#666}"""


def write_report(out_dir: Path, stage_dirs: dict[str, Path], summary: dict, title: str = "alignment report") -> Path:
    """Write out_dir/report.html from the stages' metrics.jsonl and gold samples and the summary's scores."""
    out_dir = Path(out_dir)
    sections = [f"<h1>{html.escape(title)}</h1>", "<h2>Scores</h2>", _score_table(summary)]
    sections.append("<h2>Training curves</h2>")
    for name, directory in stage_dirs.items():
        rows = read_metrics(Path(directory) / "metrics.jsonl")
        charts = []
        for keys in CURVES.get(name.split("-round")[0], [("loss",)]):
            lines = {k: pts for k in keys if (pts := series(rows, k))}
            charts.append(line_chart(" / ".join(lines), lines))
        charts = [c for c in charts if c]
        if charts:
            sections.append(f'<h3>{html.escape(name)}</h3><div class="plots" data-stage="{html.escape(name)}">'
                            f'{"".join(charts)}</div>')
    if "ppo" in stage_dirs:
        rows = read_metrics(Path(stage_dirs["ppo"]) / "metrics.jsonl")
        trade = [(r["objective/kl"], r["objective/scores"]) for r in rows
                 if isinstance(r.get("objective/kl"), (int, float)) and isinstance(r.get("objective/scores"), (int, float))]
        chart = line_chart("reward against KL over RL iterations", {"objective/scores": trade},
                           x_label="objective/kl (to the reference)", markers=True)
        if chart:
            sections += ["<h2>Reward against KL</h2>", f'<div class="plots" id="reward-kl">{chart}</div>']
    columns: dict[str, list[dict]] = {}
    first = next(iter(stage_dirs.values()), None)
    if first is not None:
        columns["base"] = _read_samples(Path(first) / "gold_samples_before.jsonl")
    for name, directory in stage_dirs.items():
        columns[name] = _read_samples(Path(directory) / "gold_samples_after.jsonl")
    sections += ["<h2>Sample generations (held-out prompts, greedy)</h2>", _samples_table(columns)]
    page = (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>")
    path = out_dir / "report.html"
    path.write_text(page)
    return path


def write_eval_report(out_dir: Path, result: dict) -> Path:
    """out_dir/report.html for `align eval`: every number of eval.json in a table, and the samples."""
    out_dir = Path(out_dir)
    subject = result.get("policy") or result.get("reward_model") or "model"
    numbers = "".join(f'<tr><td>{html.escape(k)}</td><td class="num" data-key="{html.escape(k)}">{_fmt(v)}</td></tr>'
                      for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    sections = [f"<h1>align eval: {html.escape(str(subject))}</h1>", "<h2>Metrics</h2>",
                f'<table id="metrics"><tbody>{numbers}</tbody></table>']
    samples = result.get("samples") or []
    if samples:
        keys = [k for k in samples[0] if k not in ("id",)]
        head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
        body = "".join("<tr>" + "".join(
            f"<td><pre>{html.escape(_fmt(s[k]) if isinstance(s.get(k), float) else str(s.get(k, '')))}</pre></td>"
            for k in keys) + "</tr>" for s in samples)
        sections += ["<h2>Samples</h2>", f'<table id="samples"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>']
    page = (f'<!doctype html><html><head><meta charset="utf-8"><title>align eval</title><style>{STYLE}</style>'
            f"</head><body>{''.join(sections)}</body></html>")
    path = out_dir / "report.html"
    path.write_text(page)
    return path
