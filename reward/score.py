"""`align score`: score pairs or prompt+response rows from a file with a trained reward model.

Input rows may be any preference shape (scores both responses, writes `reward_chosen`,
`reward_rejected`, `margin`) or single responses: `prompt` + `response` or `completion` (strings or
message lists) or a `messages` conversation (scores its final assistant turn).
Output: one JSON object per input row, in input order, with the row's origin.
"""

from __future__ import annotations

import json
from pathlib import Path

from alignment.data.preference import PairRejected, to_pair
from alignment.data.shapes import EXAMPLES, check_messages, shape_of
from alignment.data.sources import DataError, Row, read_rows
from reward.scorer import RewardScorer


def _row_items(row: Row) -> list[tuple[str, object, object]]:
    """[(name, prompt, response)] for one input row: a single response (prompt + response or completion, or a
    conversation ending with an assistant turn), or both responses of a preference row."""
    data = row.data
    single = next((key for key in ("response", "completion") if key in data), None)
    if "prompt" in data and single and "chosen" not in data:
        return [("reward", data["prompt"], data[single])]
    if "messages" in data:
        messages = check_messages(data["messages"], row.origin, "messages")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{row.origin}: field 'messages' must end with an assistant turn to be scored")
        return [("reward", messages[:-1], messages[-1:])]
    if shape_of(data, "preference") is None and "chosen" not in data and "rejected" not in data:
        raise DataError(f"{row.origin}: cannot tell the row's shape from its fields {sorted(data)}; align score "
                        "takes a response with its prompt, a conversation, or a preference pair:\n    "
                        + "\n    ".join([EXAMPLES["prompt_completion"] + "  (or 'response' for 'completion')",
                                        EXAMPLES["messages"], EXAMPLES["explicit"]]))
    pair = to_pair(row)
    return [("reward_chosen", pair.prompt, pair.chosen), ("reward_rejected", pair.prompt, pair.rejected)]


def main(args) -> int:
    scorer = RewardScorer(args.model, normalize=args.normalize, trust_remote_code=args.trust_remote_code)
    max_length = args.max_length or scorer.max_length
    rows = read_rows(args.data)
    items, records = [], []
    for number, row in enumerate(rows):
        record = {"origin": row.origin}
        try:
            for name, prompt, response in _row_items(row):
                ids, cut = scorer.read(prompt, response, max_length=max_length)
                items.append((number, name, ids))
                if cut:
                    record["truncated"] = True
        except PairRejected as exc:
            record["skipped"] = exc.reason
        records.append(record)
    rewards = scorer.score_batched([seq for _, _, seq in items], args.batch_size, progress=True)
    for (number, name, _), value in zip(items, rewards):
        records[number][name] = value
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as handle:
        for record in records:
            if "reward_chosen" in record and "reward_rejected" in record:
                record["margin"] = record["reward_chosen"] - record["reward_rejected"]
            handle.write(json.dumps(record) + "\n")
    pairs = [r for r in records if "margin" in r]
    summary = f"scored {len(records)} rows -> {out}"
    if pairs:
        summary += f"; pair accuracy {sum(r['margin'] > 0 for r in pairs) / len(pairs):.3f} on {len(pairs)} pairs"
    truncated = sum("truncated" in r for r in records)
    if truncated:
        summary += f"; {truncated} rows cut to {max_length} tokens as training cuts them ('truncated')"
    skipped = sum("skipped" in r for r in records)
    if skipped:
        summary += f"; {skipped} rows not scorable (see 'skipped')"
    print(summary)
    return 0
