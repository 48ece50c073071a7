"""`align pairs`: on-policy preference pairs, sampled from a policy and ranked by a judge.

Offline pairs teach a policy about mistakes someone else made; pairs drawn from the
policy itself put the preference signal exactly where the policy is unsure (the
"on-policy" / iterative DPO recipe: Xiong et al. 2024, "Iterative Preference Learning
from Human Feedback", arXiv:2312.11456; Guo et al. 2024, "Direct Language Model
Alignment from Online AI Feedback", arXiv:2402.04792).

Steps:
  1. Read prompt rows (`prompt` as a string or message list; built-in prompt rows also
     carry a `gold` spec for the verifier).
  2. Sample `samples` responses per prompt from the policy (temperature sampling, seeded).
     A sample that max_new_tokens cut before its stop token is written as truncated
     (`chosen_truncated` / `rejected_truncated`): the preference loaders then train on it
     without the end-of-turn the policy never produced, so DPO sees the sequence the policy
     sampled (FAILURES row 11: a rollout and training that disagree on the sequence).
  3. Score every response with the judge: the built-in task's verifier (`gold`) or a
     reward model directory exported by `align rm` (which reads a truncated sample as
     produced, without an end of turn); `--missing-eos-penalty` lowers a truncated
     sample's score, as `ppo.missing_eos_penalty` does in online RL.
  4. Keep the best and the worst response of each prompt as (chosen, rejected) when their
     scores differ by at least `min_gap`; prompts whose samples all tie are counted and
     dropped, never written. With `--chosen reference` (prompts with gold specs) the chosen
     response is instead the verifier's reference answer and the rejected one the worst
     sample, when it falls short of full credit: the policy's own mistakes against the
     right answer, also where no sample found it (SPIN, Chen et al. 2024, arXiv:2401.01335,
     with the verifier choosing which samples to reject).
  5. Write JSONL in the explicit prompt/chosen/rejected shape the preference loaders read,
     with the judge's scores, and print a report. With a reward-model judge on prompts
     that carry gold specs, the report also says how often the judge agrees with gold.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignment.builtin import task
from alignment.core.export import load_exported
from alignment.core.models import load_tokenizer, resolve_model_path
from alignment.data.sources import DataError, read_rows
from alignment.data.text import stop_token_ids
from alignment.evaluate.gold import generate_ids
from reward.scorer import RewardScorer, sequence_ids

GOLD_JUDGE = "gold"


@dataclass
class PairsReport:
    prompts: int = 0
    samples: int = 0
    pairs: int = 0
    dropped_all_tied: int = 0
    """Prompts whose samples all tie (--chosen reference: whose samples are all right)."""
    truncated_samples: int = 0
    """Samples max_new_tokens cut before their stop token."""
    truncated_in_pairs: int = 0
    """Chosen or rejected responses written as truncated."""
    judge_agrees_with_gold: int = 0
    judged_against_gold: int = 0
    mean_sample_score: float = 0.0
    seconds: dict = field(default_factory=dict)

    def format(self) -> str:
        text = (f"pairs: {self.prompts} prompts x {self.samples // max(self.prompts, 1)} samples -> "
                f"{self.pairs} pairs written, {self.dropped_all_tied} prompts dropped "
                f"(all samples tied; with --chosen reference: all right); "
                f"{self.truncated_samples} samples cut by max_new_tokens ({self.truncated_in_pairs} in pairs, "
                f"trained without an end of turn); mean sample score {self.mean_sample_score:.3f}")
        if self.judged_against_gold:
            text += (f"; judge agrees with gold on {self.judge_agrees_with_gold}/{self.judged_against_gold} "
                     "pairs gold can order")
        timing = ", ".join(f"{k} {v:.0f}s" for k, v in self.seconds.items())
        return f"{text} ({timing})"


def _prompt_messages(row) -> list[dict]:
    prompt = row.data.get("prompt")
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        return prompt
    raise DataError(f"{row.origin}: field 'prompt' must be a string or a list of messages")


@dataclass(frozen=True)
class Sample:
    text: str
    truncated: bool
    """max_new_tokens ended it before its stop token."""


def sample_responses(model, tokenizer, prompts: list[list[dict]], samples: int, temperature: float,
                     max_new_tokens: int, batch_size: int, seed: int,
                     device: torch.device = torch.device("cpu")) -> list[list[Sample]]:
    """`samples` sampled completions per chat prompt; shape [len(prompts)][samples]."""

    if temperature <= 0:
        raise ValueError("on-policy pairs need sampling: temperature must be above 0")
    torch.manual_seed(seed)
    rows = generate_ids(model, tokenizer, prompts, max_new_tokens, batch_size, device,
                        samples=samples, temperature=temperature)
    stops = set(stop_token_ids(tokenizer))
    flat = [Sample(tokenizer.decode(row, skip_special_tokens=True).strip(), truncated=not (row and row[-1] in stops))
            for row in rows]
    return [flat[i : i + samples] for i in range(0, len(flat), samples)]


def best_and_worst(scores: list[float], min_gap: float) -> tuple[int, int] | None:
    """Indices (best, worst) of one prompt's samples, or None when the gap is below min_gap.

    Ties go to the earliest sample, so the result is deterministic.
    """
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    return (best, worst) if scores[best] - scores[worst] >= min_gap else None


def make_pairs(args) -> PairsReport:

    report = PairsReport()
    clock = time.time()
    # Step 1. Prompts.
    rows = read_rows(args.prompts)
    if args.num_prompts:
        # one seeded shuffle; --offset picks a later slice of it (online DPO rounds: new prompts each round)
        order = random.Random(args.seed).sample(rows, len(rows))
        offset = getattr(args, "offset", 0) % max(len(order), 1)
        if offset + args.num_prompts > len(order):
            print(f"note: {args.prompts} has {len(order)} prompts; prompts {offset}..{offset + args.num_prompts} "
                  "wrap around to ones used before")
        rows = [order[(offset + i) % len(order)] for i in range(min(args.num_prompts, len(order)))]
    prompts = [_prompt_messages(row) for row in rows]
    golds = [row.data.get("gold") for row in rows]
    by_reference = getattr(args, "chosen", "best") == "reference"
    if by_reference and args.judge != GOLD_JUDGE:
        raise DataError("--chosen reference ranks the samples with the verifier: use it with --judge gold")
    if args.judge == GOLD_JUDGE and not all(golds):
        missing = next(row.origin for row, gold in zip(rows, golds) if not gold)
        raise DataError(f"{missing}: the gold judge needs a 'gold' spec on every prompt row "
                        "(built-in prompt files have one); use --judge RM_DIR for other prompts")

    # Step 2. Sample from the policy (a plain transformers model: no engine hooks, fastest generate).
    model_dir = resolve_model_path(args.model)
    tokenizer = load_tokenizer(model_dir, args.trust_remote_code)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy = load_exported(model_dir, "causal_lm", trust_remote_code=args.trust_remote_code).to(device).eval()
    responses = sample_responses(policy, tokenizer, prompts, args.samples, args.temperature,
                                 args.max_new_tokens, args.batch_size, args.seed, device)
    del policy
    report.seconds["sampling"] = time.time() - clock

    # Step 3. Judge every response.
    clock = time.time()
    if args.judge == GOLD_JUDGE:
        scores = [[task.score(gold, r.text) for r in group] for gold, group in zip(golds, responses)]
    else:

        scorer = RewardScorer(args.judge, trust_remote_code=args.trust_remote_code)
        # a truncated sample is read as produced, without an end of turn (as `align ppo` reads it)
        flat = [sequence_ids(scorer.tokenizer, p, r.text, args.max_length or scorer.max_length,
                             scorer.max_prompt_length, ended=not r.truncated)
                for p, group in zip(prompts, responses) for r in group]
        values = scorer.score_batched(flat, args.batch_size)
        scores = [values[i : i + args.samples] for i in range(0, len(values), args.samples)]
    penalty = getattr(args, "missing_eos_penalty", None)
    if penalty is not None:
        scores = [[s - penalty * r.truncated for s, r in zip(group_scores, group)]
                  for group_scores, group in zip(scores, responses)]
    report.seconds["judging"] = time.time() - clock

    # Step 4 and 5. Best vs worst per prompt, written in the explicit preference shape.
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = []
    for row, prompt, gold, group, group_scores in zip(rows, prompts, golds, responses, scores):
        report.prompts += 1
        report.samples += len(group)
        report.truncated_samples += sum(r.truncated for r in group)
        report.mean_sample_score += sum(group_scores)
        if by_reference:
            worst = min(range(len(group)), key=lambda i: (group_scores[i], i))
            if group_scores[worst] >= task.FULL_CREDIT:
                report.dropped_all_tied += 1  # every sample right: nothing to reject
                continue
            chosen, score_chosen = Sample(task.reference_answer(gold), truncated=False), task.FULL_CREDIT
        else:
            picked = best_and_worst(group_scores, args.min_gap)
            if picked is None:
                report.dropped_all_tied += 1
                continue
            best, worst = picked
            chosen, score_chosen = group[best], group_scores[best]
        rejected = group[worst]
        record = {"prompt": prompt,
                  "chosen": [{"role": "assistant", "content": chosen.text}],
                  "rejected": [{"role": "assistant", "content": rejected.text}],
                  "chosen_truncated": chosen.truncated, "rejected_truncated": rejected.truncated,
                  "score_chosen": score_chosen, "score_rejected": group_scores[worst],
                  "source": row.origin}
        report.truncated_in_pairs += chosen.truncated + rejected.truncated
        if "id" in row.data:
            record["id"] = row.data["id"]
        if gold and args.judge != GOLD_JUDGE:
            gold_best, gold_worst = task.score(gold, chosen.text), task.score(gold, rejected.text)
            if gold_best != gold_worst:
                report.judged_against_gold += 1
                report.judge_agrees_with_gold += gold_best > gold_worst
        records.append(record)
    report.pairs = len(records)
    report.mean_sample_score /= max(report.samples, 1)
    tmp = out.with_suffix(out.suffix + ".partial")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    tmp.replace(out)  # never a half-written pairs file under the final name
    (out.parent / (out.stem + ".report.json")).write_text(json.dumps(report.__dict__, indent=2) + "\n")
    return report


def main(args) -> int:
    report = make_pairs(args)
    print(report.format())
    if report.pairs == 0:
        print(f"error: no pairs written to {args.out}: every prompt's samples tied "
              "(raise --temperature or --samples, or lower --min-gap)", file=sys.stderr)
        return 1
    print(f"wrote {report.pairs} pairs -> {args.out}")
    return 0
