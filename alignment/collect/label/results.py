"""Items in, statistics and training pairs out.

- `items_from_pairs`: any preference file our loaders read (align pairs output included): a = chosen,
  b = rejected as the file had them, an AI judge's scores kept when the file carries them.
- `items_from_arena`: two policies' responses to the same prompts (rows {id?, prompt, response}).
- `items_from_responses`: single answers to judge good or bad (thumbs): rows {id?, prompt, completion} (or
  response / answer; or a `messages` list whose last turn is the answer), strings or message lists.
- `stats`: per annotator counts and seconds per label; Cohen's kappa per annotator pair; Krippendorff's
  alpha over all; agreement of the human majority with the AI judge; arena win rates with Wilson intervals;
  for thumbs, the share of good votes with its Wilson interval, pairwise agreement and unanimous items.
- `export`: pairs: one explicit prompt/chosen/rejected row per item with a majority preference, with its
  provenance; ties, "both bad" and low-agreement items dropped on request and counted. Thumbs: TRL's
  unpaired preference rows (prompt, completion, label: a boolean, true for good) with provenance.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from pathlib import Path

from alignment.collect.label.agreement import cohen_kappa, krippendorff_alpha_nominal, majority, wilson_interval
from alignment.collect.label.store import Item, Store
from alignment.data.preference import PairRejected, to_pair
from alignment.data.sources import DataError, read_rows


def _as_text(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n\n".join(f"{m.get('role', '')}: {m.get('content', '')}" if len(value) > 1 else str(m.get("content", ""))
                           for m in value if isinstance(m, dict))
    return str(value)


def items_from_pairs(source: str) -> list[Item]:

    items, skipped = [], 0
    for n, row in enumerate(read_rows(source)):
        try:
            pair = to_pair(row)
        except PairRejected:
            skipped += 1
            continue
        # the rows as the file had them (message lists stay message lists), exported as they were; the flat
        # text is only for display
        meta = {"source": row.origin, "raw": {"prompt": pair.prompt, "a": pair.chosen, "b": pair.rejected}}
        if "score_chosen" in row.data and "score_rejected" in row.data:
            meta["ai"] = {"a": row.data["score_chosen"], "b": row.data["score_rejected"]}
        items.append(Item(str(row.data.get("id", f"item-{n}")), _as_text(pair.prompt), _as_text(pair.chosen),
                          _as_text(pair.rejected), meta))
    if skipped:
        print(f"{source}: {skipped} rows not usable as pairs (identical or empty responses) were not imported")
    return items


def items_from_arena(first: str, second: str, names: tuple[str, str]) -> list[Item]:
    rows_a, rows_b = read_rows(first), read_rows(second)
    by_id = {str(r.data.get("id", i)): r for i, r in enumerate(rows_b)}
    items = []
    for i, row in enumerate(rows_a):
        key = str(row.data.get("id", i))
        other = by_id.get(key)
        if other is None:
            raise DataError(f"{row.origin}: prompt {key!r} has no response in {second}")
        if _as_text(other.data.get("prompt")) != _as_text(row.data.get("prompt")):
            raise DataError(f"{row.origin} and {other.origin}: the same id holds different prompts")
        items.append(Item(f"arena-{key}", _as_text(row.data["prompt"]), _as_text(row.data["response"]),
                          _as_text(other.data["response"]),
                          {"arena": {"a": names[0], "b": names[1]},
                           "raw": {"prompt": row.data["prompt"], "a": row.data["response"], "b": other.data["response"]}}))
    return items


ANSWER_KEYS = ("completion", "response", "answer", "output")


def items_from_responses(source: str) -> list[Item]:
    """Single answers for thumbs up / down; a `label` the file already has is kept as `given` (compared in stats)."""
    items = []
    for n, row in enumerate(read_rows(source)):
        data = row.data
        prompt = data.get("prompt")
        answer = next((data[k] for k in ANSWER_KEYS if data.get(k) not in (None, "", [])), None)
        if (answer is None and isinstance(data.get("messages"), list) and len(data["messages"]) >= 2
                and isinstance(data["messages"][-1], dict) and data["messages"][-1].get("role") == "assistant"):
            prompt, answer = data["messages"][:-1], data["messages"][-1:]
        if prompt in (None, "", []) or answer is None:
            raise DataError(f"{row.origin}: a row needs a prompt and an answer ({' / '.join(ANSWER_KEYS)}, or "
                            f"messages ending with the assistant's turn); it has {sorted(data)}")
        meta = {"source": row.origin, "raw": {"prompt": prompt, "completion": answer}}
        if isinstance(data.get("label"), bool):
            meta["given"] = data["label"]
        items.append(Item(str(data.get("id", f"item-{n}")), _as_text(prompt), _as_text(answer), "", meta, "single"))
    return items


def category(label: dict) -> str:
    """What a label says about the candidates, whichever side was on the left."""
    return label["preferred"] or label["choice"]


def stats(store: Store) -> dict:
    labels = store.labels()
    items = {item.id: item for item in store.items()}
    by_item: dict[str, dict[str, str]] = defaultdict(dict)
    per_annotator: dict[str, dict] = {}
    for label in labels:
        by_item[label["item_id"]][label["annotator"]] = category(label)
        entry = per_annotator.setdefault(label["annotator"], {"labels": 0, "seconds": []})
        entry["labels"] += 1
        if label["seconds"] is not None:
            entry["seconds"].append(label["seconds"])
    def median(values: list[float]) -> float | None:
        v, n = sorted(values), len(values)
        return None if n == 0 else v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2

    annotators = {name: {"labels": e["labels"], "median_seconds_per_label": median(e["seconds"])}
                  for name, e in per_annotator.items()}
    kappas = {}
    for x, y in itertools.combinations(sorted(per_annotator), 2):
        shared = [i for i, votes in by_item.items() if x in votes and y in votes]
        if shared:
            kappas[f"{x}|{y}"] = {"items": len(shared), "kappa": cohen_kappa([by_item[i][x] for i in shared],
                                                                             [by_item[i][y] for i in shared])}
    alpha = krippendorff_alpha_nominal([list(v.values()) for v in by_item.values()])
    result = {"items": len(items), "labels": len(labels), "labelled_items": len(by_item), "annotators": annotators,
              "cohen_kappa": kappas,
              "krippendorff_alpha": None if math.isnan(alpha) else alpha}  # None: no item has two labels
    # Humans against the AI judge, on items whose judge preferred one candidate.
    agree = judged = 0
    for item_id, votes in by_item.items():
        ai = items[item_id].meta.get("ai")
        if not ai or ai["a"] == ai["b"]:
            continue
        winner, _ = majority(list(votes.values()))
        if winner in ("a", "b"):
            judged += 1
            agree += winner == ("a" if ai["a"] > ai["b"] else "b")
    if judged:
        result["human_ai_agreement"] = {"items": judged, "agreement": agree / judged}
    # Arena: the human win rate of policy a over policy b (a tie is half a win; 'both bad' too).
    arena = defaultdict(lambda: [0.0, 0])
    for item_id, votes in by_item.items():
        names = items[item_id].meta.get("arena")
        if not names:
            continue
        for vote in votes.values():
            arena[(names["a"], names["b"])][0] += 1.0 if vote == "a" else 0.0 if vote == "b" else 0.5
            arena[(names["a"], names["b"])][1] += 1
    if arena:
        result["arena"] = {f"{a} vs {b}": {"votes": n, "win_rate": w / n, "ci95": wilson_interval(w, n)}
                           for (a, b), (w, n) in arena.items()}
    if any(item.kind == "single" for item in items.values()):
        result["thumbs"] = thumbs_stats(by_item, items)
    return result


def thumbs_stats(by_item: dict[str, dict[str, str]], items: dict[str, Item]) -> dict:
    """Thumbs up / down: votes, the share of good votes (Wilson interval), the raw agreement of two annotators on
    one item averaged over the items two or more labelled, the unanimous share of those items, and agreement of
    the majority with a label the source file already had."""
    votes = [v for item_votes in by_item.values() for v in item_votes.values()]
    good = sum(v == "good" for v in votes)
    pairs = agreeing = unanimous = multi = 0
    for item_votes in by_item.values():
        values = list(item_votes.values())
        if len(values) < 2:
            continue
        multi += 1
        unanimous += len(set(values)) == 1
        for x, y in itertools.combinations(values, 2):
            pairs += 1
            agreeing += x == y
    out = {"items": sum(item.kind == "single" for item in items.values()), "labelled_items": len(by_item),
           "votes": {"good": good, "bad": len(votes) - good},
           "good_share": good / len(votes) if votes else None,
           "good_share_ci95": wilson_interval(good, len(votes)) if votes else None,
           "items_with_two_or_more_labels": multi,
           "pairwise_agreement": agreeing / pairs if pairs else None,
           "unanimous_share": unanimous / multi if multi else None}
    given = matched = 0
    for item_id, item_votes in by_item.items():
        if "given" in items[item_id].meta:
            winner, _ = majority(list(item_votes.values()))
            if winner in ("good", "bad"):
                given += 1
                matched += (winner == "good") == items[item_id].meta["given"]
    if given:
        out["agreement_with_given_labels"] = {"items": given, "agreement": matched / given}
    return out


def _provenance(labels: list[dict], item: Item, agreement: float) -> dict:
    return {"votes": {label["annotator"]: category(label) for label in labels},
            "annotator_ids": [label["annotator_id"] for label in labels],
            "agreement": agreement,
            "timestamps": [label["created"] for label in labels],
            "rationales": [label["rationale"] for label in labels if label["rationale"]],
            **{k: v for k, v in item.meta.items() if k != "raw"}}


def export_unpaired(store: Store, out: str | Path, min_agreement: float = 0.0) -> dict:
    """Thumbs labels as TRL's unpaired preference rows: {"prompt", "completion", "label": true for good, false for
    bad} (prompt and completion as the source had them: strings or message lists), with the item id and provenance;
    items whose annotators split evenly, or agree less than `min_agreement`, are dropped and counted."""
    items = {item.id: item for item in store.items()}
    by_item: dict[str, list[dict]] = defaultdict(list)
    for label in store.labels():
        by_item[label["item_id"]].append(label)
    rows, dropped = [], {"no_majority": 0, "low_agreement": 0, "unlabelled": len(items) - len(by_item)}
    for item_id, labels in by_item.items():
        item = items[item_id]
        winner, agreement = majority([category(label) for label in labels])
        if winner == "no_majority":
            dropped["no_majority"] += 1
            continue
        if agreement < min_agreement:
            dropped["low_agreement"] += 1
            continue
        raw = item.meta.get("raw") or {"prompt": item.prompt, "completion": item.a}
        rows.append({"prompt": raw["prompt"], "completion": raw["completion"], "label": winner == "good",
                     "id": item_id, "provenance": _provenance(labels, item, agreement)})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {"written": len(rows), "good": sum(r["label"] for r in rows), "bad": sum(not r["label"] for r in rows),
            "dropped": dropped, "out": str(out), "shape": "unpaired preference (prompt, completion, label)"}


def export(store: Store, out: str | Path, drop_ties: bool = True, drop_both_bad: bool = True,
           min_agreement: float = 0.0) -> dict:
    """Explicit prompt/chosen/rejected JSONL with provenance (a thumbs store: unpaired rows, export_unpaired);
    returns what was written and dropped."""
    if store.kind() == "single":
        return export_unpaired(store, out, min_agreement)
    items = {item.id: item for item in store.items()}
    by_item: dict[str, list[dict]] = defaultdict(list)
    for label in store.labels():
        by_item[label["item_id"]].append(label)
    rows, dropped = [], {"tie": 0, "both_bad": 0, "no_majority": 0, "low_agreement": 0, "not_trainable": 0,
                         "unlabelled": len(items) - len(by_item)}
    for item_id, labels in by_item.items():
        item = items[item_id]
        winner, agreement = majority([category(label) for label in labels])
        if winner == "no_majority":  # annotators split evenly: no preference to train on
            dropped["no_majority"] += 1
            continue
        if (winner == "tie" and drop_ties) or (winner == "both_bad" and drop_both_bad):
            dropped[winner] += 1
            continue
        if agreement < min_agreement:
            dropped["low_agreement"] += 1
            continue
        if winner not in ("a", "b"):  # a kept tie / both-bad has no chosen side: it cannot be a training pair
            dropped["not_trainable"] += 1
            continue
        raw = item.meta.get("raw")
        prompt, a, b = (raw["prompt"], raw["a"], raw["b"]) if raw else (item.prompt, item.a, item.b)
        chosen, rejected = (a, b) if winner == "a" else (b, a)
        strengths = [label["strength"] for label in labels if category(label) == winner and label["strength"]]
        provenance = _provenance(labels, item, agreement)
        provenance["strength"] = sum(strengths) / len(strengths) if strengths else None
        provenance["shown_left"] = {label["annotator"]: label["left_side"] for label in labels}
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "id": item_id, "provenance": provenance})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {"written": len(rows), "dropped": dropped, "out": str(out)}
