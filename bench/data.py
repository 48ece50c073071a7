"""The data both sides of a benchmark get: the same rows, as the same token ids where the benchmark says so.

Where the hh-rlhf data lies. The preference benchmarks (bench.rm, bench.dpo, bench.rm_quality,
bench.dpo_quality, bench.kto_quality) read the harmless-base file of Anthropic's hh-rlhf in place, never copied:
`DIR/harmless-base-test.jsonl` with DIR given by `--hh-rlhf DIR`, else $ALIGN_HH_RLHF, else
`../shared/data/hh-rlhf-harmless` relative to the repository root (a relative DIR is taken from the
repository root as well).

Speed benchmarks (bench.rm, bench.dpo): `build_pairs`. Both sides train on the same preference pairs:
the first rows of the hh-rlhf file, normalised by ``alignment.data.preference.to_pair`` and tokenized by
``alignment.data.preference.load_pairs`` (the very functions our stages call, with the same max_length /
max_prompt_length), so the pair list here is the list our stage builds from ``data.max_rows`` rows. The
batches are our sampler's (``GlobalBatchSampler``, same seed): TRL gets the pairs in that order with
sequential sampling, so every optimizer step of both sides holds the same pairs, split into the same
micro-batches.

Why token ids for TRL and not its conversational prompt/chosen/rejected path: on these rows TRL's
chat-template tokenization gives the same prompt ids as ours but one more token per response (the "\\n"
after the final <|im_end|>), and it treats long pairs differently (RewardTrainer drops a pair with a
sequence over max_length; DPOTrainer cuts each sequence's end, prompt first), where ours keeps the
prompt's last max_prompt_length tokens and cuts the responses. At a max_length this CPU can afford, most
hh-rlhf pairs are long, so the two paths would train on different pairs. TRL is therefore handed our
token ids (`write_trl_records`: RewardTrainer gets its documented processed-dataset columns
chosen_ids/rejected_ids; DPOTrainer prompt_ids/chosen_ids/rejected_ids, the columns its own collator
consumes). Tokenization is setup on both sides, outside the timed steps. bench.sft does the same with
the built-in task's SFT rows (`build_sft_data`: input_ids + labels).

Quality benchmarks (bench.rm_quality, bench.dpo_quality, bench.kto_quality): `held_out_split()` is our loader's own seeded
split (alignment.data.sources.split_rows, fraction HELD_FRACTION, seed SPLIT_SEED) of the hh-rlhf file:
a recipe with `data.eval_fraction: 0.2` and `seed: 0` holds out exactly these rows
(configs/smollm2/rm-hh.yaml and dpo-hh.yaml do), so the tuned recipes and both benchmarks are scored on
one held-out set. Training takes the first N rows of the other part, which is what our stage's
`data.max_rows: N` takes after the same split. Ours reads the raw file (its hh-rlhf parser is part of the
product); TRL cannot read raw hh-rlhf transcripts, so it gets the pairs our parser makes of them
(`parse_pairs`), as conversational prompt / chosen / rejected messages, which is the conversion a TRL
user writes by hand. Rows the parser rejects (empty response, chosen == rejected, different prompts) are
given to neither side. bench.kto_quality gives both sides one file instead: these pairs as unpaired answers
(prompt, completion, label), TRL's shape, which our KTO stage reads as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SEED = 0  # every benchmark's seed: sampler order, model init, TRL's seed

HH_RLHF_DEFAULT = "../shared/data/hh-rlhf-harmless"  # relative to the repository root
HH_RLHF_ENV = "ALIGN_HH_RLHF"
HH_RLHF_FILE = "harmless-base-test.jsonl"
HELD_FRACTION = 0.2  # 360 of the 1,800 rows
SPLIT_SEED = 0

SFT_ROWS = "builtin:sft_train"
PROMPTS = "builtin:prompts_train"


# ---------------------------------------------------------------------------
# Where things are
# ---------------------------------------------------------------------------


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_jsonl(records, path: Path) -> None:
    with open(path, "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def smollm2_path() -> str:
    """Local HF directory of the built-in SmolLM2-135M-Instruct (converted from GGUF once, then cached)."""
    from alignment.core.models import resolve_model_path

    return resolve_model_path("smollm2-135m")


def add_hh_rlhf_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--hh-rlhf", metavar="DIR", default=os.environ.get(HH_RLHF_ENV) or HH_RLHF_DEFAULT,
        help=f"folder holding hh-rlhf's {HH_RLHF_FILE}, read in place; a relative DIR is taken from the "
             f"repository root (default: ${HH_RLHF_ENV} if set, else {HH_RLHF_DEFAULT})")


def hh_rlhf_file(folder: str) -> str:
    """The hh-rlhf harmless-base file in `folder` (--hh-rlhf), as an absolute path without '..'."""
    path = Path(os.path.normpath(REPO / Path(folder).expanduser()))  # REPO / an absolute path is that path
    file = path / HH_RLHF_FILE
    if not file.is_file():
        raise SystemExit(f"no {HH_RLHF_FILE} in {path}: pass --hh-rlhf DIR (or set ${HH_RLHF_ENV})")
    return str(file)


def batch_layout(global_batch: int, micro_batch: int):
    """One rank's BatchLayout, what GlobalBatchSampler reads."""
    from alignment.core.config import BatchLayout

    return BatchLayout(global_batch_size=global_batch, micro_batch_size=micro_batch,
                       grad_accum_steps=global_batch // micro_batch, world_size=1)


def load_dataset(path):
    """A datasets.Dataset of a JSON-lines file (what a TRL worker trains on)."""
    from datasets import Dataset

    return Dataset.from_list(read_jsonl(path))


# ---------------------------------------------------------------------------
# The built-in task: SFT rows, prompts
# ---------------------------------------------------------------------------


def build_sft_data(path: Path, steps: int, global_batch: int, micro_batch: int, max_length: int) -> dict:
    """The built-in SFT rows for exactly one epoch of `steps` steps, tokenized by our code (chat template, loss
    on the assistant turn only), written to `path` as TRL records (input_ids, labels) in our sampler's order."""
    from alignment.core.config import DataConfig
    from alignment.core.models import load_tokenizer
    from alignment.data.report import DataReport
    from alignment.data.sampler import GlobalBatchSampler
    from alignment.data.sft import build_sft_examples
    from alignment.data.sources import read_rows

    n_rows = steps * global_batch  # exactly one epoch on both sides
    rows = read_rows(SFT_ROWS)[:n_rows]
    if len(rows) < n_rows:
        raise SystemExit(f"{SFT_ROWS} has {len(rows)} rows, need {n_rows}")
    tokenizer = load_tokenizer(smollm2_path())
    report = DataReport("train")
    examples = build_sft_examples(rows, tokenizer, DataConfig(train=SFT_ROWS, max_length=max_length), True, report)
    if len(examples) != n_rows:
        raise SystemExit(f"{n_rows - len(examples)} rows dropped by tokenization; the sides would differ")
    order = GlobalBatchSampler(len(examples), batch_layout(global_batch, micro_batch), SEED).epoch_order(0)
    write_jsonl(({"input_ids": examples[i].input_ids, "labels": examples[i].labels} for i in order), path)
    return {"rows": n_rows, "steps": steps, "path": str(path), "tokens": report.tokens,
            "targets": report.trainable_tokens, "pad_id": tokenizer.pad_token_id}


def prompt_rows(count: int) -> list[dict]:
    """The first `count` rows of the built-in task's train prompts (each {"prompt": ..., "gold": ...})."""
    from alignment.data.sources import read_rows

    return [r.data for r in read_rows(PROMPTS)[:count]]


def prompt_ids(rows: list[dict], tokenizer) -> list[list[int]]:
    """The prompts as our chat-template path tokenizes them for generation."""
    from alignment.data import text

    return [text.prompt_ids(tokenizer, r["prompt"]) for r in rows]


# ---------------------------------------------------------------------------
# Speed benchmarks: the pairs our stage trains on, in its order
# ---------------------------------------------------------------------------


@dataclass
class PairData:
    source: str  # the hh-rlhf file
    max_rows: int  # data.max_rows for our stage: its first max_rows rows give exactly `pairs` pairs
    pairs: list  # TokenizedPair, in file order (our stage's train_pairs)
    order: list[int]  # pair indices in training order: step k = order[k*G:(k+1)*G], micro-batches in turn
    tokens: int  # non-padding tokens over every step (chosen + rejected sequences)
    truncated: int  # pairs cut to max_length (identically for both sides: same ids)
    dropped: dict  # rows our loader rejected (empty response, ...), counted in max_rows
    padded_tokens: int  # tokens incl. padding with right-padded [2B, T] micro-batches (both sides' padded layout)
    packed_tokens: int  # tokens incl. padding with our packed micro-batches (rows of max_length)
    seq_len_mean: float
    seq_len_max: int
    max_length: int
    max_prompt_length: int
    pad_id: int = 0

    def describe(self) -> str:
        dropped = ", ".join(f"{v} {k}" for k, v in self.dropped.items()) or "none"
        return (f"data: first {self.max_rows} rows of {self.source} -> {len(self.pairs)} pairs (rows dropped by our "
                f"loader: {dropped}); {self.truncated} pairs truncated to max_length {self.max_length} (prompt keeps "
                f"its last {self.max_prompt_length} tokens; same ids on both sides); {self.tokens} tokens in "
                f"{2 * len(self.pairs)} sequences (mean {self.seq_len_mean:.0f}, max {self.seq_len_max}); "
                f"right-padded micro-batches hold {self.padded_tokens} token slots "
                f"({100 * (1 - self.tokens / self.padded_tokens):.0f}% padding), packed ones {self.packed_tokens} "
                f"({100 * (1 - self.tokens / self.packed_tokens):.0f}% padding)")


def build_pairs(source: str, steps: int, global_batch: int, micro_batch: int, max_length: int,
                max_prompt_length: int, reward_model: bool = False) -> PairData:
    """The pairs our stage will train on over `steps` steps, and their order, computed with our own loaders (a
    reward model's responses carry the template's suffix: alignment.data.text)."""
    from alignment.core.config import DataConfig
    from alignment.core.models import load_tokenizer
    from alignment.data.layout import collate_pairs
    from alignment.data.preference import load_pairs
    from alignment.data.report import DataReport
    from alignment.data.sampler import GlobalBatchSampler
    from alignment.data.sources import read_rows

    tokenizer = load_tokenizer(smollm2_path())
    rows = read_rows(source)
    cfg = DataConfig(train=source, max_length=max_length)
    need = steps * global_batch
    # Smallest prefix of the file with `need` usable pairs (our stage takes rows[:data.max_rows]).
    n = need
    while True:
        if n > len(rows):
            raise SystemExit(f"{source} has too few usable pairs for {need}")
        report = DataReport("train")
        pairs = load_pairs(rows[:n], tokenizer, cfg, max_prompt_length, report, reward_model)
        if len(pairs) >= need:
            break
        n += need - len(pairs)
    while len(pairs) > need:  # only if the last rows added more than needed
        n -= 1
        report = DataReport("train")
        pairs = load_pairs(rows[:n], tokenizer, cfg, max_prompt_length, report, reward_model)
    assert len(pairs) == need
    sampler = GlobalBatchSampler(len(pairs), batch_layout(global_batch, micro_batch), SEED)
    order: list[int] = []
    padded = packed = 0
    for step in range(steps):
        for idx in sampler.micro_batches(step, 0):
            order += idx
            chunk = [pairs[i] for i in idx]
            padded += collate_pairs(chunk, tokenizer.pad_token_id)["input_ids"].numel()
            packed += collate_pairs(chunk, tokenizer.pad_token_id, max_length)["input_ids"].numel()
    assert sorted(order) == list(range(need)), "one epoch: every pair exactly once"
    lengths = [len(p.prompt_ids) + len(r) for p in pairs for r in (p.chosen_ids, p.rejected_ids)]
    return PairData(source=source, max_rows=n, pairs=pairs, order=order, tokens=sum(lengths),
                    truncated=report.truncated, dropped=dict(report.dropped), padded_tokens=padded,
                    packed_tokens=packed, seq_len_mean=statistics.mean(lengths), seq_len_max=max(lengths),
                    max_length=max_length, max_prompt_length=max_prompt_length, pad_id=tokenizer.pad_token_id)


def write_trl_records(data: PairData, path: Path, kind: str) -> None:
    """TRL's input, one JSON object per pair in training order (RM: full sequences; DPO: prompt + responses)."""

    def record(p) -> dict:
        if kind == "rm":
            return {"chosen_ids": p.prompt_ids + p.chosen_ids, "rejected_ids": p.prompt_ids + p.rejected_ids}
        return {"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids}

    write_jsonl((record(data.pairs[i]) for i in data.order), path)


# ---------------------------------------------------------------------------
# Quality benchmarks: the fixed held-out split, conversational pairs
# ---------------------------------------------------------------------------


@dataclass
class Pair:
    prompt: list  # chat messages
    chosen: list  # [assistant message]
    rejected: list
    origin: str

    def as_record(self) -> dict:
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}


def held_out_split(source: str):
    """(train rows, held-out rows) of the hh-rlhf file: our loader's seeded split."""
    from alignment.data.sources import read_rows, split_rows

    return split_rows(read_rows(source), HELD_FRACTION, SPLIT_SEED)


def parse_pairs(rows) -> tuple[list[Pair], Counter]:
    """Rows -> conversational pairs (our hh-rlhf parser), and the count of rows rejected, by reason."""
    from alignment.data.preference import PairRejected, to_pair

    pairs, rejected = [], Counter()
    for row in rows:
        try:
            p = to_pair(row)
        except PairRejected as exc:
            rejected[exc.reason] += 1
            continue
        pairs.append(Pair(p.prompt, p.chosen, p.rejected, p.origin))
    return pairs, rejected


@dataclass
class QualitySplit:
    """The quality benchmarks' rows: the first `train_rows` of the training part and the held-out pairs scored."""

    source: str  # the hh-rlhf file
    train_rows: list
    train_pairs: list[Pair]
    rejected: Counter  # training rows our parser rejected, by reason (given to neither side)
    held_rows: list
    held: list[Pair]  # the held-out pairs scored (the first max_held_out if given)
    held_rejected: Counter

    def describe(self) -> str:
        return (f"train: first {len(self.train_rows)} rows of the training part of {self.source} "
                f"({len(self.train_pairs)} usable pairs; parser rejected {dict(self.rejected) or 'none'}); held out: "
                f"{len(self.held_rows)} rows -> {len(self.held)} pairs scored (parser rejected "
                f"{dict(self.held_rejected) or 'none'})")


def quality_split(source: str, train_rows: int, max_held_out: int | None = None) -> QualitySplit:
    train, held_rows = held_out_split(source)
    train = train[:train_rows]
    train_pairs, rejected = parse_pairs(train)
    held, held_rejected = parse_pairs(held_rows)
    return QualitySplit(source, train, train_pairs, rejected, held_rows, held[:max_held_out] if max_held_out else held,
                        held_rejected)


def ours_data_report(rows, source: str, max_length: int, max_prompt_length: int | None, reward_model: bool) -> dict:
    """What our stage keeps, truncates and drops of `rows` (the loader the stage calls, same settings)."""
    from alignment.core.config import DataConfig
    from alignment.core.models import load_tokenizer
    from alignment.data.preference import load_pairs
    from alignment.data.report import DataReport

    report = DataReport("train")
    tokenizer = load_tokenizer(smollm2_path())
    kept = load_pairs(rows, tokenizer, DataConfig(train=source, max_length=max_length), max_prompt_length, report,
                      reward_model)
    return {"rows": len(rows), "kept": len(kept), "truncated": report.truncated,
            "dropped": sum(report.dropped.values()), "dropped_by_reason": dict(report.dropped)}


def write_records(pairs: list[Pair], path: Path) -> None:
    write_jsonl((p.as_record() for p in pairs), path)
