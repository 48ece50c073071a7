"""`align data check FILE [--eval FILE]`: what is in an SFT or preference file before anyone trains on it.

Reports rows by shape; malformed rows with file:line and the reason; rows our loaders would reject as
pairs (with the reason); exact and near-duplicate prompts (near: equal ignoring case, whitespace, quotes
and sentence punctuation); prompts shared with the --eval file (leakage); chosen identical to
rejected; and the length bias of chosen against rejected, with the accuracy of the baseline that
always prefers the shorter answer (ties half). Writes a JSON report (--out, default
./<file name>.check.json: never beside a shared input) and prints a short summary.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from alignment.data.preference import PairRejected, to_pair
from alignment.data.shapes import detect_sft_format, detect_shape
from alignment.data.sources import DataError, read_rows

EXAMPLES = 5


def _text(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in value)
    return "" if value is None else str(value)


def normalise(text: str) -> str:
    """Near-duplicate key: case, runs of whitespace, quotes and sentence punctuation ignored; symbols such
    as + - * / kept (they change what is asked)."""
    return re.sub(r"\s+", " ", re.sub(r"[\"'`.,;:!?]", " ", text.lower())).strip()


def _rows(source: str):
    """(origin, prompt text or None, chosen, rejected, shape, error, rejected_reason) for every row."""

    for row in read_rows(source, on_bad_row="skip"):
        if row.error:
            yield row.origin, None, None, None, "malformed", row.error, None
            continue
        data = row.data
        try:
            if ("chosen" in data and "rejected" in data) or ("response_a" in data and "response_b" in data):
                shape = detect_shape(data, row.origin)
                try:
                    pair = to_pair(row)
                except PairRejected as exc:  # still a prompt for the duplicate and leakage counts
                    prompt = _text(data["prompt"]) if "prompt" in data else None
                    yield row.origin, prompt, None, None, shape, None, str(exc)
                    continue
                yield row.origin, _text(pair.prompt), _text(pair.chosen), _text(pair.rejected), shape, None, None
            elif "prompt" in data and not ({"completion", "messages", "conversations", "text"} & set(data)):
                yield row.origin, _text(data["prompt"]), None, None, "prompt", None, None  # prompt sets
            else:
                shape = detect_sft_format(data, row.origin)
                prompt = (data.get("prompt") if shape == "prompt_completion" else
                          [m for m in data.get("messages", data.get("conversations", [])) if isinstance(m, dict)
                           and m.get("role") == "user"][:1] if shape == "messages" else None)
                yield row.origin, _text(prompt) if prompt else None, None, None, shape, None, None
        except DataError as exc:
            yield row.origin, None, None, None, "malformed", str(exc), None


def check(source: str, eval_source: str | None = None) -> dict:
    shapes: Counter = Counter()
    malformed, unusable = [], Counter()
    prompts: dict[str, list[str]] = {}
    near: dict[str, set[str]] = {}
    identical, longer, shorter_wins, pairs = [], 0, 0.0, 0
    chosen_len = rejected_len = 0
    for origin, prompt, chosen, rejected, shape, error, reason in _rows(source):
        shapes[shape] += 1
        if error:
            malformed.append(error)
            continue
        if prompt is not None:
            prompts.setdefault(prompt, []).append(origin)
            near.setdefault(normalise(prompt), set()).add(prompt)
        if reason:
            unusable[reason] += 1
            if "identical" in reason:
                identical.append(origin)
            continue
        if chosen is not None:
            pairs += 1
            if chosen == rejected:
                identical.append(origin)
            lc, lr = len(chosen), len(rejected)
            chosen_len += lc
            rejected_len += lr
            longer += lc > lr
            shorter_wins += 1.0 if lc < lr else 0.5 if lc == lr else 0.0
    exact_dups = {p: o for p, o in prompts.items() if len(o) > 1}
    near_dups = {k: v for k, v in near.items() if len(v) > 1}
    report = {
        "file": source, "rows": sum(shapes.values()), "shapes": dict(shapes),
        "malformed": {"count": len(malformed), "examples": malformed[:EXAMPLES]},
        "unusable_pairs": dict(unusable),
        "duplicate_prompts": {"exact_groups": len(exact_dups),
                              "rows_in_exact_groups": sum(len(o) for o in exact_dups.values()),
                              "near_groups": len(near_dups),
                              "examples": [{"prompt": p[:200], "rows": o[:4]} for p, o in list(exact_dups.items())[:EXAMPLES]],
                              "near_examples": [sorted(v)[:3] for v in list(near_dups.values())[:EXAMPLES]]},
        "chosen_equals_rejected": {"count": len(identical), "rows": identical[:EXAMPLES]},
    }
    if pairs:
        report["length_bias"] = {"pairs": pairs, "chosen_longer_share": longer / pairs,
                                 "mean_chosen_chars": chosen_len / pairs, "mean_rejected_chars": rejected_len / pairs,
                                 "shorter_answer_wins_accuracy": shorter_wins / pairs}
    if eval_source:
        eval_prompts = {normalise(p): p for _, p, *_ in _rows(eval_source) if p}
        shared = [p for p in prompts if normalise(p) in eval_prompts]
        report["leakage"] = {"eval_file": eval_source, "eval_prompts": len(eval_prompts),
                             "shared_prompts": len(shared), "examples": [p[:200] for p in shared[:EXAMPLES]]}
    return report


def summary(report: dict) -> str:
    lines = [f"{report['file']}: {report['rows']} rows ({', '.join(f'{k} {v}' for k, v in report['shapes'].items())})",
             f"  malformed: {report['malformed']['count']}" + (f" (first: {report['malformed']['examples'][0]})"
                                                            if report["malformed"]["count"] else "")]
    if report["unusable_pairs"]:
        lines.append("  unusable as pairs: " + ", ".join(f"{v} {k}" for k, v in report["unusable_pairs"].items()))
    d = report["duplicate_prompts"]
    lines.append(f"  duplicate prompts: {d['exact_groups']} exact groups ({d['rows_in_exact_groups']} rows), "
                 f"{d['near_groups']} near-duplicate groups")
    lines.append(f"  chosen identical to rejected: {report['chosen_equals_rejected']['count']}")
    if "length_bias" in report:
        b = report["length_bias"]
        lines.append(f"  length: chosen longer in {b['chosen_longer_share']:.1%} of {b['pairs']} pairs "
                     f"({b['mean_chosen_chars']:.0f} vs {b['mean_rejected_chars']:.0f} chars); 'shorter answer "
                     f"wins' baseline accuracy {b['shorter_answer_wins_accuracy']:.3f}")
    if "leakage" in report:
        lines.append(f"  leakage: {report['leakage']['shared_prompts']} prompts also in {report['leakage']['eval_file']}")
    return "\n".join(lines)


def main(args) -> int:
    report = check(args.file, args.eval)
    out = Path(args.out) if args.out else Path(Path(str(args.file).replace(":", "_")).name + ".check.json")
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(summary(report))
    print(f"report: {out}")
    return 0
