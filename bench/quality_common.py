"""Helpers shared by the quality benchmarks (bench/rm_quality.py, bench/dpo_quality.py).

The speed benchmarks ask "how fast"; these ask "how good at the same work". Each trains our
stage and TRL's trainer on the same hh-rlhf pairs with the same settings, then scores both
exports the plain way, with transformers alone, on held-out pairs neither side saw.

Split. `held_out_split()` is our loader's own seeded split (alignment.core.data.split_rows,
fraction HELD_FRACTION, seed SPLIT_SEED) of the shared file, read in place: a recipe with
`data.eval_fraction: 0.2` and `seed: 0` holds out exactly these rows (configs/smollm2/rm-hh.yaml
and dpo-hh.yaml do), so the tuned recipes and both benchmarks are scored on one held-out set.
Training takes the first N rows of the other part, which is what our stage's `data.max_rows: N`
takes after the same split.

Both sides get the same rows. Ours reads the raw file (its hh-rlhf parser is part of the
product); TRL cannot read raw hh-rlhf transcripts, so it gets the pairs our parser
(alignment.core.preference.to_pair) makes of them, as conversational prompt / chosen / rejected
messages, which is the conversion a TRL user writes by hand. Rows the parser rejects (empty
response, chosen == rejected, different prompts) are given to neither side. From there each
side tokenizes and cuts long pairs its own way (TRL's defaults: RewardTrainer drops a pair
with a sequence over max_length, DPOTrainer keeps the start and cuts the end); both counts are
printed.

Plain scoring, the same for both exports, in fp32, one conversation at a time (no padding):
- reward model: AutoModelForSequenceClassification, the tokenizer's chat template over the
  whole conversation (prompt + response), the reward transformers pools at the last token;
  accuracy = share of held-out pairs with r(chosen) > r(rejected).
- DPO policy: AutoModelForCausalLM; log p(response | prompt) = the sum of the token log-probs
  of the conversation's tokens after the prompt rendered with add_generation_prompt=True;
  implicit reward = log p_policy - log p_start (beta does not change the sign); accuracy =
  share with implicit reward of chosen > rejected.
Held-out conversations are scored whole, however long (no truncation).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.setup_path()

DATA = str(common.REPO.parent / "shared" / "data" / "hh-rlhf-harmless" / "harmless-base-test.jsonl")
HELD_FRACTION = 0.2  # 360 of the 1,800 rows
SPLIT_SEED = 0


@dataclass
class Pair:
    prompt: list  # chat messages
    chosen: list  # [assistant message]
    rejected: list
    origin: str

    def as_record(self) -> dict:
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}


def held_out_split():
    """(train rows, held-out rows) of the shared file: our loader's seeded split."""
    from alignment.data.sources import read_rows, split_rows

    return split_rows(read_rows(DATA), HELD_FRACTION, SPLIT_SEED)


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


def ours_data_report(rows, max_length: int, max_prompt_length: int | None, reward_model: bool) -> dict:
    """What our stage keeps, truncates and drops of `rows` (the loader the stage calls, same settings)."""
    from alignment.core.config import DataConfig
    from alignment.data.report import DataReport
    from alignment.core.models import load_tokenizer
    from alignment.data.preference import load_pairs

    report = DataReport("train")
    tokenizer = load_tokenizer(common.smollm2_path())
    kept = load_pairs(rows, tokenizer, DataConfig(train=DATA, max_length=max_length), max_prompt_length, report,
                      reward_model)
    return {"rows": len(rows), "kept": len(kept), "truncated": report.truncated,
            "dropped": sum(report.dropped.values()), "dropped_by_reason": dict(report.dropped)}


def write_records(pairs: list[Pair], path: Path) -> None:
    path.write_text("".join(json.dumps(p.as_record()) + "\n" for p in pairs))


def read_records(path: Path) -> list[Pair]:
    return [Pair(r["prompt"], r["chosen"], r["rejected"], f"{path}:{i + 1}")
            for i, r in enumerate(common.read_jsonl(path))]


def _conversation_ids(tokenizer, messages: list, add_generation_prompt: bool = False) -> list[int]:
    enc = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                        return_dict=True)
    return list(enc["input_ids"])


def plain_reward_accuracy(model_dir: str, pairs: list[Pair], label: str) -> dict:
    """Held-out accuracy of a reward model loaded and scored with transformers alone (see the header)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    margins, started = [], time.perf_counter()
    with torch.no_grad():
        for pair in pairs:
            r = [model(input_ids=torch.tensor([_conversation_ids(tokenizer, pair.prompt + side)])).logits[0, 0].item()
                 for side in (pair.chosen, pair.rejected)]
            margins.append(r[0] - r[1])
    return _accuracy(margins, label, started)


def response_logps(model_dir: str, pairs: list[Pair]) -> list[tuple[float, float]]:
    """Summed log p(chosen | prompt), log p(rejected | prompt) of a causal LM, transformers alone."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for pair in pairs:
            prompt = _conversation_ids(tokenizer, pair.prompt, add_generation_prompt=True)
            values = []
            for side in (pair.chosen, pair.rejected):
                full = _conversation_ids(tokenizer, pair.prompt + side)
                if full[: len(prompt)] != prompt:
                    raise RuntimeError(f"{pair.origin}: the chat template does not render the prompt as a prefix")
                ids = torch.tensor([full])
                logits = model(input_ids=ids).logits[0, :-1].float()
                logp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
                values.append(logp[len(prompt) - 1 :].sum().item())
            out.append((values[0], values[1]))
    return out


def implicit_reward_accuracy(policy: list[tuple[float, float]], start: list[tuple[float, float]], label: str,
                             started: float) -> dict:
    margins = [(pc - sc) - (pr - sr) for (pc, pr), (sc, sr) in zip(policy, start)]
    return _accuracy(margins, label, started)


def _accuracy(margins: list[float], label: str, started: float) -> dict:
    if any(not math.isfinite(m) for m in margins):
        raise RuntimeError(f"{label}: non-finite scores on the held-out pairs")
    correct = sum(m > 0 for m in margins) + 0.5 * sum(m == 0 for m in margins)
    n = len(margins)
    acc = correct / n
    stderr = math.sqrt(acc * (1 - acc) / n)
    result = {"accuracy": acc, "stderr": stderr, "pairs": n, "mean_margin": sum(margins) / n,
              "seconds": time.perf_counter() - started}
    print(f"[{label}] held-out accuracy {acc:.4f} (+-{stderr:.3f} s.e.) on {n} pairs, mean margin "
          f"{result['mean_margin']:.4f}, scored in {result['seconds']:.0f}s", flush=True)
    return result


def print_data_table(rows: list[tuple[str, dict]]) -> None:
    print(f"\n{'side':<6} {'rows':>5} {'kept':>5} {'truncated':>9} {'dropped':>7}  notes")
    for name, d in rows:
        print(f"{name:<6} {d['rows']:>5} {d['kept']:>5} {d['truncated']:>9} {d['dropped']:>7}  {d.get('note', '')}")


def score_recipe(stage: str, recipe: str, workdir: Path, max_held_out: int | None, started: float) -> int:
    """Train `align STAGE RECIPE` as the recipe says (output into workdir) and score its export on the held-out
    pairs the plain way; the recipe must hold out this module's rows (data.eval_fraction, seed)."""
    from alignment.core.recipes import load_recipe

    r = load_recipe(recipe, stage, [])
    train = Path(r.data.train) if Path(r.data.train).is_absolute() else common.REPO / r.data.train
    if (r.data.eval, r.data.eval_fraction, r.seed) != (None, HELD_FRACTION, SPLIT_SEED) or train.resolve() \
            != Path(DATA).resolve():
        raise SystemExit(f"{recipe}: must train on {DATA} with data.eval_fraction {HELD_FRACTION} and seed "
                         f"{SPLIT_SEED} so that its held-out rows are this benchmark's")
    out = workdir / "recipe"
    cmd = [common.PYTHON, "-m", "alignment.cli", stage, recipe, "--set", f"output_dir={out}",
           "--set", "logging.progress_bar=false"]
    train_wall = common.run_logged(cmd, workdir / "recipe.log", stage)
    _, held_rows = held_out_split()
    held, _ = parse_pairs(held_rows)
    held = held[:max_held_out] if max_held_out else held
    final = out / "final"
    if (final / "merged").is_dir():  # LoRA: the merged export is the plain-transformers model
        final = final / "merged"
    t0 = time.perf_counter()
    if stage == "rm":
        result = plain_reward_accuracy(str(final), held, recipe)
    else:
        cached = workdir / f"start_logps_{len(held)}.json"  # as bench/dpo_quality.py caches it
        start = json.loads(cached.read_text()) if cached.exists() else response_logps(common.smollm2_path(), held)
        cached.write_text(json.dumps(start))
        result = implicit_reward_accuracy(response_logps(str(final), held), start, recipe, t0)
    print(f"{recipe}: held-out accuracy {result['accuracy']:.4f} on {result['pairs']} pairs (plain scoring); "
          f"training wall time {train_wall / 60:.1f} min; total {(time.perf_counter() - started) / 60:.1f} min")
    (workdir / "recipe_result.json").write_text(json.dumps({"recipe": recipe, "train_wall_s": train_wall, **result}))
    return 0
