"""output_dir/report.html: one self-contained page per pipeline (no network, no scripts, plots as inline SVG).

What it shows, top to bottom:
1. the scores: held-out gold score after each stage (base = the model SFT started from), one column per
   task family when the stages measured them (`gold/<family>` metrics, or summary.json's `families`), and
   the reward model's held-out accuracy; the same numbers as summary.json, and a sentence where a stage or
   a measurement is absent,
2. training curves of every stage, read from its metrics.jsonl: losses, accuracies, rewards, the learning
   rate and the gradient norm, one axis per scale; noisy curves smoothed (EMA) with the raw series faint
   behind, sparse ones (evaluations) with markers,
3. reward against KL over the online-RL iterations (the trade-off RLHF buys), coloured by iteration with
   arrows in the order they ran,
4. sample generations side by side: the same held-out prompts answered by the policy after each stage,
   with their gold scores (each stage's gold_samples_*.jsonl); conversations shown as turns.

The plots are drawn by matplotlib into SVG (text kept as <text>, ids made unique per plot, no metadata, no
links). Each is an <svg class="plot"> with ticks (`g.tick`), gridlines, a legend (`g.legend`) and its series
as `g.series` elements carrying data-name and data-points, so a browser test can check what it shows.
"""

from __future__ import annotations

import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Panel:
    """One plot: a title and the metric keys drawn on it (absent keys left out)."""

    title: str
    keys: tuple[str, ...]
    log_y: bool = False
    smooth: bool = True   # False for curves that are not noisy (the learning rate schedule)


# Curves worth a look per stage, in order. Keys whose scales differ by more than SCALE_RATIO are split onto
# separate axes even when listed together.
COMMON = [Panel("learning rate", ("train/lr", "learning_rate", "lr"), smooth=False),
          Panel("gradient norm", ("train/grad_norm", "grad_norm"))]
PANELS = {
    "sft": [Panel("loss", ("loss", "eval/loss")), Panel("throughput (tokens/s)", ("train/tokens_per_s",))],
    "rm": [Panel("loss", ("loss", "eval/loss")), Panel("pairwise accuracy", ("rewards/accuracies", "eval/accuracy")),
           Panel("reward margin", ("rewards/margins", "eval/margin"))],
    "dpo": [Panel("loss", ("loss", "eval/loss")),
            Panel("preference accuracy", ("rewards/accuracies", "eval/rewards/accuracies")),
            Panel("reward margin", ("rewards/margins", "eval/rewards/margins")),
            Panel("implicit rewards", ("rewards/chosen", "rewards/rejected"))],
    "ppo": [Panel("reward", ("objective/scores", "objective/rlhf_reward")), Panel("KL to the reference", ("objective/kl",)),
            Panel("response length (tokens)", ("response/length",)), Panel("policy loss", ("loss/policy",)),
            Panel("value loss", ("loss/value",)), Panel("entropy", ("objective/entropy",)),
            Panel("clip fraction", ("policy/clipfrac",))],
}
SCALE_RATIO = 20.0
SMOOTHING = 0.6       # EMA weight for noisy curves; 0 or None turns smoothing off
SMOOTH_MIN_POINTS = 20
SPARSE_POINTS = 25    # a series with at most this many points gets markers
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
KNOWN_GOLD = {"score", "exact", "n", "score_before", "sample_score"}


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(rows: list[dict], key: str, x_key: str = "step") -> list[tuple[float, float]]:
    """(x, y) points of one metric, skipping rows without it and non-finite values."""
    points = []
    for row in rows:
        x, y = row.get(x_key), row.get(key)
        if _finite(x) and _finite(y):
            points.append((float(x), float(y)))
    return points


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average with the start-up bias removed (as TensorBoard draws it)."""
    out, acc = [], 0.0
    for i, v in enumerate(values, 1):
        acc = weight * acc + (1 - weight) * v
        out.append(acc / (1 - weight ** i))
    return out


def split_by_scale(lines: dict[str, list[tuple[float, float]]]) -> list[dict[str, list[tuple[float, float]]]]:
    """Groups of series that can share one y axis: magnitudes within SCALE_RATIO of each other."""
    groups: list[tuple[float, dict]] = []
    for name, pts in lines.items():
        size = max(abs(y) for _, y in pts) or 1e-12
        for i, (ref, group) in enumerate(groups):
            if max(size, ref) / min(size, ref) <= SCALE_RATIO:
                group[name] = pts
                groups[i] = (max(ref, size), group)
                break
        else:
            groups.append((size, {name: pts}))
    return [g for _, g in groups]


# -- SVG from matplotlib --------------------------------------------------------------------------------

_PLOT_COUNT = [0]


def _figure(width: float = 4.6, height: float = 3.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=72, layout="constrained")
    return fig, fig.add_subplot()


def _style_axes(ax, title: str, x_label: str, y_label: str | None = None) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=10, loc="left")
    ax.set_xlabel(x_label, fontsize=8.5, color="#444")
    if y_label:
        ax.set_ylabel(y_label, fontsize=8.5, color="#444")
    ax.grid(True, color="#e3e3e3", linewidth=0.7)
    ax.set_axisbelow(True)
    ax.tick_params(labelsize=8, colors="#444", length=3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color("#999")
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=x_label == "step"))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=6))
    ax.ticklabel_format(axis="y", useOffset=False)


def _svg(fig, title: str, series_info: dict[str, tuple[str, int]], extra_class: str = "") -> str:
    """The figure as an inline <svg class="plot">: ids unique to this plot, no metadata, no external names;
    the groups of the series (gid `series-i`), ticks and legend carry classes and data attributes."""
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "alignment-report",
                                 "font.sans-serif": ["DejaVu Sans", "Liberation Sans", "Arial"]}):
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.S)
    svg = re.sub(r"<style type=\"text/css\">.*?</style>\s*", "", svg, flags=re.S)
    svg = re.sub(r"\s+xmlns(:xlink)?=\"[^\"]*\"", "", svg)
    svg = svg.replace("xlink:href=", "href=")
    _PLOT_COUNT[0] += 1
    prefix = f"plot{_PLOT_COUNT[0]}-"
    ids = set(re.findall(r'\bid="([^"]+)"', svg))

    def rename(m: re.Match) -> str:
        name = m.group(2)
        return f"{m.group(1)}{prefix}{name}{m.group(3)}" if name in ids else m.group(0)

    svg = re.sub(r'(\bid=")([^"]+)(")', rename, svg)
    svg = re.sub(r'(url\(#)([^)]+)(\))', rename, svg)
    svg = re.sub(r'(href="#)([^"]+)(")', rename, svg)

    def label(m: re.Match) -> str:
        kind, rest = m.group(1), m.group(2)
        if kind in ("xtick", "ytick"):
            return f'<g id="{prefix}{kind}{rest}" class="tick {kind[0]}"'
        if kind in ("legend", "arrow", "path"):
            return f'<g id="{prefix}{kind}{rest}" class="{kind}"'
        index = rest.lstrip("-")
        name, points = series_info.get(f"{kind}-{index}", ("", 0))
        return (f'<g id="{prefix}{kind}{rest}" class="{kind}" data-name="{html.escape(name)}" '
                f'data-points="{points}"')

    svg = re.sub(rf'<g id="{prefix}(xtick|ytick|legend|series|raw|arrow|path)((?:_|-)\d+)"', label, svg)
    cls = f"plot {extra_class}".strip()
    return svg.replace("<svg ", f'<svg class="{cls}" role="img" aria-label="{html.escape(title)}" ', 1)


def line_chart(title: str, lines: dict[str, list[tuple[float, float]]], x_label: str = "step",
               markers: bool = False, smoothing: float | None = SMOOTHING, log_y: bool = False) -> str:
    """One plot with a line per named series (empty ones left out; "" when none has a point): gridlines, ticks,
    a legend with swatches; markers on sparse series; a noisy series smoothed, the raw one faint behind."""
    lines = {k: v for k, v in lines.items() if v}
    if not lines:
        return ""
    fig, ax = _figure()
    info: dict[str, tuple[str, int]] = {}
    for i, (name, pts) in enumerate(lines.items()):
        colour = COLOURS[i % len(COLOURS)]
        xs, ys = [x for x, _ in pts], [y for _, y in pts]
        sparse = markers or len(pts) <= SPARSE_POINTS
        style = dict(marker="o", markersize=3.5) if sparse else {}
        if smoothing and len(pts) >= SMOOTH_MIN_POINTS:
            raw, = ax.plot(xs, ys, color=colour, alpha=0.25, linewidth=0.9)
            raw.set_gid(f"raw-{i}")
            info[f"raw-{i}"] = (name, len(pts))
            line, = ax.plot(xs, smooth(ys, smoothing), color=colour, linewidth=1.6, label=f"{name} (smoothed)", **style)
        else:
            line, = ax.plot(xs, ys, color=colour, linewidth=1.4, label=name, **style)
        line.set_gid(f"series-{i}")
        info[f"series-{i}"] = (name, len(pts))
    if log_y and all(y > 0 for pts in lines.values() for _, y in pts):
        ax.set_yscale("log")
    _style_axes(ax, title, x_label)
    xs = {x for pts in lines.values() for x, _ in pts}
    if len(xs) == 1:  # one step: a window around it, whole-number ticks
        x = xs.pop()
        ax.set_xlim(x - 1, x + 1)
    if log_y and ax.get_yscale() == "log":
        from matplotlib.ticker import LogLocator

        ax.yaxis.set_major_locator(LogLocator())
    ax.legend(fontsize=8, frameon=True, framealpha=0.85, edgecolor="#ddd", loc="best")
    return _svg(fig, title, info)


def trajectory_chart(title: str, points: list[tuple[float, float, float]], x_label: str, y_label: str,
                     smoothing: float | None = SMOOTHING) -> str:
    """y against x over iterations (each point (step, x, y)): every iteration a dot coloured by its step (with a
    colour bar), the path through them in order drawn with arrows (smoothed, as an EMA of both coordinates, when
    there are SMOOTH_MIN_POINTS iterations or more, with the raw path faint behind), start and end marked."""
    if not points:
        return ""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.collections import LineCollection
    from matplotlib.colors import Normalize

    steps = np.array([p[0] for p in points], dtype=float)
    xy = np.array([(p[1], p[2]) for p in points], dtype=float)
    smoothed = bool(smoothing) and len(points) >= SMOOTH_MIN_POINTS
    path_xy = np.array([smooth(list(xy[:, 0]), smoothing), smooth(list(xy[:, 1]), smoothing)]).T if smoothed else xy
    fig, ax = _figure(6.4, 4.0)
    cmap = colormaps["viridis"]
    norm = Normalize(steps.min(), max(steps.max(), steps.min() + 1))
    info = {"series-0": (y_label, len(points))}
    if len(points) > 1:
        if smoothed:
            raw, = ax.plot(xy[:, 0], xy[:, 1], color="#bbb", linewidth=0.6, alpha=0.6, zorder=1)
            raw.set_gid("raw-0")
            info["raw-0"] = ("raw path", len(points))
        segments = np.stack([path_xy[:-1], path_xy[1:]], axis=1)
        path = LineCollection(segments, cmap=cmap, norm=norm, linewidths=2.0 if smoothed else 1.2, zorder=2)
        path.set_array(steps[1:])
        path.set_gid("path-0")
        ax.add_collection(path)
        every = max(1, (len(points) - 1) // 10)  # about ten arrows
        colours = cmap(norm(steps[1:]))
        for k in range(every // 2, len(points) - 1, every):
            (x0, y0), (x1, y1) = path_xy[k], path_xy[k + 1]
            if (x0, y0) != (x1, y1):
                arrow = ax.annotate("", xy=(x1, y1), xytext=(x0, y0), zorder=4,
                                    arrowprops=dict(arrowstyle="-|>", color=colours[k], lw=1.4, mutation_scale=12,
                                                    shrinkA=0, shrinkB=0))
                arrow.arrow_patch.set_gid(f"arrow-{k}")
    dots = ax.scatter(xy[:, 0], xy[:, 1], c=steps, cmap=cmap, norm=norm, s=16 if smoothed else 22, zorder=3,
                      alpha=0.75 if smoothed else 1.0, edgecolors="white", linewidths=0.4)
    dots.set_gid("series-0")
    for where, text, offset in ((path_xy[0], "start", (5, -11)), (path_xy[-1], "end", (5, 5))):
        ax.annotate(text, where, textcoords="offset points", xytext=offset, fontsize=8.5, fontweight="bold",
                    color="#222", zorder=5)
    ax.autoscale_view()
    _style_axes(ax, title, x_label, y_label)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", linestyle="", color=cmap(0.5), label="one iteration"),
               Line2D([], [], color=cmap(0.5), linewidth=2.0 if smoothed else 1.2,
                      label=f"path in order (EMA {smoothing})" if smoothed else "path in order")]
    ax.legend(handles=handles, fontsize=8, frameon=True, framealpha=0.85, edgecolor="#ddd", loc="best")
    bar = fig.colorbar(dots, ax=ax, pad=0.02)
    bar.set_label("iteration (step)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    from matplotlib.ticker import MaxNLocator

    bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return _svg(fig, title, info, "trajectory")


# -- tables ---------------------------------------------------------------------------------------------

def _read_samples(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def is_conversation(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "content" in m for m in value)


def render_text(value) -> str:
    """A prompt or a response as HTML: a message list as turns (role, then text), anything else as text."""
    if is_conversation(value):
        turns = "".join(f'<div class="turn role-{html.escape(str(m.get("role", "")))}"><span class="role">'
                        f'{html.escape(str(m.get("role", "")))}</span><pre>{html.escape(_content(m["content"]))}</pre></div>'
                        for m in value)
        return f'<div class="conversation">{turns}</div>'
    if isinstance(value, float):
        return f"<pre>{html.escape(_fmt(value))}</pre>"
    if isinstance(value, (dict, list)):
        return f"<pre>{html.escape(json.dumps(value, ensure_ascii=False, indent=1))}</pre>"
    return f"<pre>{html.escape('' if value is None else str(value))}</pre>"


def _content(content) -> str:
    if isinstance(content, list):  # multimodal parts: their text
        return "".join(str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def _stage_families(stage_dirs: dict[str, Path]) -> dict[str, dict[str, float]]:
    """{stage: {family: score}} from the last `gold/<family>` each stage logged."""
    out: dict[str, dict[str, float]] = {}
    for name, directory in stage_dirs.items():
        last: dict = {}
        for row in read_metrics(Path(directory) / "metrics.jsonl"):
            last.update(row)
        fams = {k[5:]: v for k, v in last.items() if k.startswith("gold/") and "/" not in k[5:] and _finite(v)
                and k[5:] not in KNOWN_GOLD and not k.endswith(("_se", "_n", "_before"))}
        if fams:
            out[name] = fams
    return out


def _families(summary: dict, stage_dirs: dict[str, Path]) -> dict[str, dict[str, float]]:
    """{row (stage): {family: score}}: summary.json's `families` (either orientation) or the stages' metrics."""
    table = summary.get("families")
    rows = set(summary.get("gold", {})) | set(stage_dirs) | {"base"}
    if isinstance(table, dict) and table:
        if set(table) & rows:
            return {str(s): {str(f): v for f, v in (fams or {}).items() if _finite(v)} for s, fams in table.items()
                    if isinstance(fams, dict)}
        flipped: dict[str, dict[str, float]] = {}
        for fam, by_stage in table.items():
            for stage, v in (by_stage or {}).items():
                if _finite(v):
                    flipped.setdefault(str(stage), {})[str(fam)] = v
        return flipped
    return _stage_families(stage_dirs)


def _score_table(summary: dict, stage_dirs: dict[str, Path] | None = None) -> str:
    stage_dirs = stage_dirs or {}
    gold = dict(summary.get("gold") or {})
    rounds = {k: v for k, v in (summary.get("dpo_rounds") or {}).items() if k != "dpo"}
    families = _families(summary, stage_dirs)
    fam_names = sorted({f for fams in families.values() for f in fams})
    order = [s for s in gold if s != "dpo"] if rounds else list(gold)
    if rounds:  # online DPO: a row per round before the last
        order += list(rounds) + (["dpo"] if "dpo" in gold else [])
        order = [s for s in order if s in gold or s in rounds]
    order += [s for s in families if s not in order]
    parts = []
    measured = any(_finite(gold.get(s, rounds.get(s))) for s in order) or bool(fam_names)
    if measured:
        head = "".join(f'<th class="num">{html.escape(f)}</th>' for f in fam_names)
        body = []
        for stage in order:
            value = gold.get(stage, rounds.get(stage))
            cell = (f'<td class="num" data-key="gold.{html.escape(stage)}">{value:.3f}</td>' if _finite(value)
                    else '<td class="num absent" title="not measured">&ndash;</td>')
            fam = families.get(stage, {})
            cells = "".join(f'<td class="num" data-key="gold.{html.escape(stage)}.{html.escape(f)}">{fam[f]:.3f}</td>'
                            if f in fam else '<td class="num absent" title="not measured">&ndash;</td>' for f in fam_names)
            label = stage if stage in gold else f"{stage} (online DPO round)"
            body.append(f"<tr><td>{html.escape(label)}</td>{cell}{cells}</tr>")
        caption = ("Held-out gold score (mean verifier score on held-out prompts, greedy answers) after each stage; "
                   "base is the model SFT started from." + (" One column per task family." if fam_names else ""))
        parts.append(f'<table id="gold-scores"><caption>{caption}</caption><thead><tr><th>after stage</th>'
                     f'<th class="num">gold score (all prompts)</th>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>')
        missing = [s for s in order if not _finite(gold.get(s, rounds.get(s)))]
        if missing:
            parts.append(f'<p class="absent">Not measured for {html.escape(", ".join(missing))} '
                         "(gold evaluation off for that stage).</p>")
    else:
        ran = f" ({html.escape(', '.join(order))} ran without it)" if order else ""
        parts.append('<p class="absent" id="no-gold">No held-out gold score: no policy stage ran a gold evaluation'
                     f"{ran}; a stage's <code>gold_eval</code> turns it on.</p>")
    if _finite(summary.get("rm_accuracy")):
        parts.append('<table id="rm-scores"><caption>Reward model on held-out preference pairs.</caption>'
                     '<thead><tr><th>reward model</th><th class="num">value</th></tr></thead><tbody>'
                     f'<tr><td>held-out pairwise accuracy</td><td class="num" data-key="rm_accuracy">'
                     f'{summary["rm_accuracy"]:.3f}</td></tr></tbody></table>')
    elif "rm" in stage_dirs:
        parts.append('<p class="absent">The reward model stage logged no held-out accuracy (no eval split).</p>')
    else:
        parts.append('<p class="absent" id="no-rm">No reward model in this run.</p>')
    return f'<section id="scores">{"".join(parts)}</section>'


def _samples_table(columns: dict[str, list[dict]], limit: int = 8) -> str:
    columns = {k: v for k, v in columns.items() if v}
    if not columns:
        return '<p class="absent">No sample generations were recorded (no stage ran a gold evaluation).</p>'
    by_id = {name: {s["id"]: s for s in rows} for name, rows in columns.items()}
    first = next(iter(columns.values()))
    ids = [s["id"] for s in first if all(s["id"] in b for b in by_id.values())][:limit]
    head = "".join(f"<th>{html.escape(n)}</th>" for n in columns)
    body = []
    for sid in ids:
        cells = "".join(f'<td>{render_text(by_id[n][sid]["response"])}'
                        f'<span class="score">gold {by_id[n][sid]["score"]:.2f}</span></td>' for n in columns)
        body.append(f'<tr><td>{render_text(by_id[next(iter(columns))][sid]["prompt"])}</td>{cells}</tr>')
    return f'<table id="samples"><thead><tr><th>prompt</th>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


STYLE = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1450px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:3px}
h3{font-size:14px;margin:16px 0 6px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #d4d4d4;padding:4px 8px;vertical-align:top}
th{background:#f6f6f6;text-align:left}caption{text-align:left;color:#555;font-size:13px;padding:2px 0 6px}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}td.absent{color:#999}p.absent{color:#666}
pre{margin:0;white-space:pre-wrap;max-width:340px;font-size:12.5px}
.plots{display:flex;flex-wrap:wrap;gap:10px}svg.plot{border:1px solid #eee;background:#fff;max-width:100%;height:auto}
svg.plot *{stroke-linejoin:round;stroke-linecap:butt}
.score{font-size:11px;color:#666}.conversation .turn{margin:0 0 4px}.role{font-size:10.5px;font-weight:600;
color:#666;text-transform:uppercase;letter-spacing:.03em;display:block}
.turn.role-assistant pre{background:#f3f7fc}.turn.role-system pre{color:#555;font-style:italic}
.note{color:#555;font-size:13px}"""


def stage_charts(name: str, rows: list[dict], smoothing: float | None = SMOOTHING) -> list[str]:
    charts = []
    for panel in PANELS.get(name.split("-round")[0], [Panel("loss", ("loss", "eval/loss"))]) + COMMON:
        lines = {k: pts for k in panel.keys if (pts := series(rows, k))}
        if not lines:
            continue
        groups = split_by_scale(lines)
        for group in groups:
            title = panel.title if len(groups) == 1 else f"{panel.title}: {' / '.join(group)}"
            charts.append(line_chart(title, group, smoothing=smoothing if panel.smooth else None, log_y=panel.log_y))
    return [c for c in charts if c]


def write_report(out_dir: Path, stage_dirs: dict[str, Path], summary: dict, title: str = "alignment report",
                 smoothing: float | None = SMOOTHING) -> Path:
    """Write out_dir/report.html from the stages' metrics.jsonl and gold samples and the summary's scores.
    `smoothing`: the EMA weight for curves of SMOOTH_MIN_POINTS points or more (0 or None: raw curves only)."""
    out_dir = Path(out_dir)
    sections = [f"<h1>{html.escape(title)}</h1>", "<h2>Scores</h2>", _score_table(summary, stage_dirs)]
    sections.append("<h2>Training curves</h2>")
    if smoothing:
        sections.append(f'<p class="note">Curves of {SMOOTH_MIN_POINTS} points or more are smoothed (exponential moving '
                        f"average, weight {smoothing}) with the raw values faint behind; evaluations and other sparse "
                        "series are drawn with markers.</p>")
    drawn = False
    for name, directory in stage_dirs.items():
        charts = stage_charts(name, read_metrics(Path(directory) / "metrics.jsonl"), smoothing)
        if charts:
            drawn = True
            sections.append(f'<h3>{html.escape(name)}</h3><div class="plots" data-stage="{html.escape(name)}">'
                            f'{"".join(charts)}</div>')
    if not drawn:
        sections.append('<p class="absent">No stage logged metrics.</p>')
    if "ppo" in stage_dirs:
        rows = read_metrics(Path(stage_dirs["ppo"]) / "metrics.jsonl")
        trade = [(r.get("step", i), r["objective/kl"], r["objective/scores"]) for i, r in enumerate(rows)
                 if _finite(r.get("objective/kl")) and _finite(r.get("objective/scores"))]
        chart = trajectory_chart("reward against KL over RL iterations", trade, "objective/kl (to the reference)",
                                 "objective/scores", smoothing)
        if chart:
            sections += ["<h2>Reward against KL</h2>",
                         '<p class="note">Each point is one iteration, coloured by its step; arrows follow the order '
                         "they ran (smoothed when there are many). Up and to the left is reward bought cheaply.</p>",
                         f'<div class="plots" id="reward-kl">{chart}</div>']
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
    """out_dir/report.html for `align eval`: every number of eval.json in a table, and the samples (conversations
    as turns)."""
    out_dir = Path(out_dir)
    subject = result.get("policy") or result.get("reward_model") or "model"
    numbers = "".join(f'<tr><td>{html.escape(k)}</td><td class="num" data-key="{html.escape(k)}">{_fmt(v)}</td></tr>'
                      for k, v in result.items() if _finite(v))
    sections = [f"<h1>align eval: {html.escape(str(subject))}</h1>", "<h2>Metrics</h2>",
                f'<table id="metrics"><thead><tr><th>metric</th><th class="num">value</th></tr></thead>'
                f"<tbody>{numbers}</tbody></table>"]
    dropped = result.get("dropped")
    if isinstance(dropped, dict) and dropped:
        rows = "".join(f'<tr><td>{html.escape(str(k))}</td><td class="num">{html.escape(str(v))}</td></tr>'
                       for k, v in dropped.items())
        sections.append(f'<table id="dropped"><caption>Rows left out</caption><tbody>{rows}</tbody></table>')
    samples = result.get("samples") or []
    if samples:
        keys = [k for k in samples[0] if k not in ("id",)]
        head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
        body = "".join("<tr>" + "".join(f"<td>{render_text(s.get(k, ''))}</td>" for k in keys) + "</tr>"
                       for s in samples)
        sections += ["<h2>Samples</h2>", f'<table id="samples"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>']
    page = (f'<!doctype html><html><head><meta charset="utf-8"><title>align eval</title><style>{STYLE}</style>'
            f"</head><body>{''.join(sections)}</body></html>")
    path = out_dir / "report.html"
    path.write_text(page)
    return path
