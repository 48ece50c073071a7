"""`align eval`: what a policy or a reward model is worth, in one eval.json and a report.html.

On a policy (--policy), over the first --num-prompts rows of --prompts:
  1. greedy responses of the policy (and of --reference when given), through the one tokenization path;
  2. the gold score (the built-in verifier, on rows that carry a gold spec) and the reward model's
     score (--reward-model) of those responses;
  3. the win rate against the reference, judged by the verifier or the reward model. Both judges
     score each response alone, so no position can be favoured and no swap is needed;
  4. KL(policy || reference) on these prompts: responses sampled from the policy at temperature 1,
     the sequence log-ratio sum_t log pi(y_t|x, y_<t) - log pi_ref(y_t|x, y_<t) averaged (k1: unbiased);
  5. response length in tokens and the share that ended with the end-of-turn token;
  6. forgetting: per-token NLL on general held-out text (shipped in alignment/evaluate/data/, or
     --forgetting-text) of the policy against its base model (--base, else the reference): the change
     says how much plain language modelling the alignment cost;
  7. a sample of prompts with both models' responses and their scores.
On a reward model (--reward-model with --pairs and no --policy): accuracy, calibration (ECE), length
bias (the correlation of reward with length), and accuracy per `category` when rows carry one.
"""

from __future__ import annotations

import json
import math
import sys
import time
from importlib import resources
from pathlib import Path

import torch

from alignment.builtin import task
from alignment.core.export import load_exported
from alignment.core.modeling import target_logprobs
from alignment.core.models import load_tokenizer, resolve_model_path
from alignment.data import text
from alignment.data.layout import IGNORE
from alignment.data.preference import PairRejected, to_pair
from alignment.data.shapes import prompt_of
from alignment.data.sources import DataError, read_rows
from alignment.evaluate.gold import generate_ids
from alignment.evaluate.report import write_eval_report
from reward.metrics import pairwise_accuracy, reward_report
from reward.scorer import RewardScorer, sequence_ids

SAMPLES_SHOWN = 12


# ---------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------

def win_rate(scores: list[float], reference_scores: list[float]) -> dict[str, float]:
    """Wins, ties and losses of paired scores, and the win rate counting a tie as half a win."""
    if len(scores) != len(reference_scores) or not scores:
        raise ValueError("win_rate needs two equally long, non-empty score lists")
    wins = sum(a > b for a, b in zip(scores, reference_scores))
    ties = sum(a == b for a, b in zip(scores, reference_scores))
    n = len(scores)
    return {"win_rate": (wins + 0.5 * ties) / n, "wins": wins / n, "ties": ties / n, "losses": (n - wins - ties) / n}


def mean_and_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


@torch.no_grad()
def continuation_logprobs(model, prefixes: list[list[int]], continuations: list[list[int]], pad_id: int,
                          batch_size: int = 16) -> list[torch.Tensor]:
    """log p(c_t | prefix, c_<t) for each continuation token, one float tensor per row [len(c)]; rows
    right-padded, scored by the training path (alignment.core.modeling.target_logprobs: fp32, output layer
    on the target positions only)."""

    out: list[torch.Tensor] = []
    device = next(model.parameters()).device
    for start in range(0, len(prefixes), batch_size):
        pairs = list(zip(prefixes[start:start + batch_size], continuations[start:start + batch_size]))
        width = max(len(p) + len(c) for p, c in pairs)
        ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        labels = torch.full((len(pairs), width), IGNORE, dtype=torch.long)
        for i, (p, c) in enumerate(pairs):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            mask[i, : len(p) + len(c)] = 1
            labels[i, len(p) : len(p) + len(c)] = torch.tensor(c, dtype=torch.long)
        batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
        logps, where = target_logprobs(model, batch)  # row-major: each row's targets in order
        rows = where[:, 0].cpu()
        logps = logps.float().cpu()
        out += [logps[rows == i] for i in range(len(pairs))]
    return out


def text_nll(model, tokenizer, paragraphs: list[str], batch_size: int = 8) -> float:
    """Mean per-token negative log-likelihood of plain paragraphs (BOS as the tokenizer adds it; the first
    token of a paragraph without BOS is context, not scored)."""
    rows = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in paragraphs]
    logps = continuation_logprobs(model, [r[:1] for r in rows], [r[1:] for r in rows], tokenizer.pad_token_id,
                                  batch_size)
    total = sum(float(lp.sum()) for lp in logps)
    count = sum(lp.numel() for lp in logps)
    return -total / max(count, 1)


def general_paragraphs(path: str | None) -> list[str]:
    raw = (Path(path).read_text() if path else
           resources.files("alignment.evaluate").joinpath("data/general_text.txt").read_text())
    return [p.strip() for p in raw.split("\n\n") if p.strip()]


# ---------------------------------------------------------------------------
# Policy evaluation
# ---------------------------------------------------------------------------

def _load_policy(path: str, trust_remote_code: bool):
    """A model to evaluate; a LoRA run's `final/` is read through its `merged/` (as the gold score reads it), or
    without one as its adapter on the base model."""
    folder = Path(path).expanduser()
    if (folder / "merged" / "config.json").is_file():
        resolved = str(folder / "merged")
    elif (folder / "adapter_config.json").is_file():
        resolved = str(folder)
    else:
        resolved = resolve_model_path(path)
    tokenizer = load_tokenizer(resolved, trust_remote_code)
    model = load_exported(resolved, "causal_lm", trust_remote_code=trust_remote_code).float().eval()
    return model, tokenizer


def _same_vocabulary(a, b, what: str) -> None:
    if a.get_vocab() != b.get_vocab():
        raise ValueError(f"{what} uses another tokenizer than the policy: KL and win rate need the same vocabulary")


def family_scores(golds: list[dict], scores: list[float], prefix: str) -> dict:
    """The gold score by family (`{prefix}/{family}` and its standard error over prompts); constraint prompts whose
    pair of constraints no training split holds also as `{prefix}/constraints_held_out_pair`."""
    groups: dict[str, list[float]] = {}
    for gold, value in zip(golds, scores):
        groups.setdefault(gold.get("family", "other"), []).append(value)
        if gold.get("held_out_pair"):
            groups.setdefault("constraints_held_out_pair", []).append(value)
    out = {}
    for family, values in sorted(groups.items()):
        out[f"{prefix}/{family}"], out[f"{prefix}/{family}_se"] = mean_and_se(values)
        out[f"{prefix}/{family}_n"] = len(values)
    return out


def paired(prefix: str, ours: list[float], theirs: list[float]) -> dict:
    """The paired gain over the reference, prompt by prompt, and its standard error."""
    gain, se = mean_and_se([a - b for a, b in zip(ours, theirs)])
    return {f"{prefix}/gain_over_reference": gain, f"{prefix}/gain_over_reference_se": se}


def sampled_gold(model, tokenizer, prompts: list, golds: list, args, device) -> list[float]:
    """Each prompt's mean gold score over --samples responses at --temperature (seeded by --seed)."""
    torch.manual_seed(args.seed)
    k = args.samples
    ids = generate_ids(model, tokenizer, prompts, args.max_new_tokens, args.batch_size, device, samples=k,
                       temperature=args.temperature)
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in ids]
    return [sum(task.score(golds[i], texts[i * k + j]) for j in range(k)) / k for i in range(len(prompts))]


def gold_spec(row: dict) -> dict | None:
    """A row's gold spec: its `gold`, or for your own prompts that carry only `constraints` (the shape
    alignment.evaluate.rewards:constraints reads) the constraints family's spec over them."""
    if row.get("gold"):
        return row["gold"]
    if row.get("constraints"):
        return {"kind": "constraints", "family": "constraints", "constraints": row["constraints"]}
    return None


def evaluate_policy(args) -> dict:
    started = time.time()
    torch.manual_seed(args.seed)
    rows = read_rows(args.prompts)[args.skip_prompts:][: args.num_prompts or None]
    if not rows:
        raise DataError(f"{args.prompts}: no prompt rows")
    prompts = [prompt_of(r.data, r.origin) for r in rows]
    prompts = [p if isinstance(p, list) else [{"role": "user", "content": p}] for p in prompts]
    golds = [gold_spec(r.data) for r in rows]
    policy, tokenizer = _load_policy(args.policy, args.trust_remote_code)
    device = torch.device("cpu")
    stops = set(text.stop_token_ids(tokenizer))
    prompt_ids = [text.prompt_ids(tokenizer, p) for p in prompts]
    result: dict = {"policy": str(args.policy), "prompts": str(args.prompts), "num_prompts": len(rows)}

    def phase(what: str) -> None:  # a long evaluation (1,024 prompts: minutes on 2 CPU cores) says where it is
        print(f"eval [{time.time() - started:5.0f} s] {what}", flush=True)

    # 1. Greedy responses.
    phase(f"greedy responses of the policy to {len(rows)} prompts")
    responses = generate_ids(policy, tokenizer, prompts, args.max_new_tokens, args.batch_size, device)
    reference = ref_tok = ref_responses = None
    if args.reference:
        reference, ref_tok = _load_policy(args.reference, args.trust_remote_code)
        _same_vocabulary(ref_tok, tokenizer, f"--reference {args.reference}")
        phase(f"greedy responses of the reference to {len(rows)} prompts")
        ref_responses = generate_ids(reference, ref_tok, prompts, args.max_new_tokens, args.batch_size, device)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    texts = [decode(r) for r in responses]
    ref_texts = [decode(r) for r in ref_responses] if ref_responses is not None else None

    # 2. Gold and reward-model scores.
    gold_rows = [i for i, g in enumerate(golds) if g]
    gold = [task.score(golds[i], texts[i]) for i in gold_rows]
    ref_gold = [task.score(golds[i], ref_texts[i]) for i in gold_rows] if ref_texts else None
    if gold:
        result["gold/score"], result["gold/score_se"] = mean_and_se(gold)
        result["gold/exact"] = sum(s == 1.0 for s in gold) / len(gold)
        result["gold/n"] = len(gold)
        gold_specs = [golds[i] for i in gold_rows]
        # Each prompt's scores, for comparisons paired prompt by prompt across separate evaluations.
        result["per_prompt"] = {"id": [rows[i].data.get("id", rows[i].origin) for i in gold_rows], "gold": gold}
        result.update(family_scores(gold_specs, gold, "gold"))
        if ref_gold:
            result.update(paired("gold", gold, ref_gold))
        if args.samples:
            gold_prompts = [prompts[i] for i in gold_rows]
            phase(f"sampled responses: {args.samples} per prompt at temperature {args.temperature}")
            sampled = sampled_gold(policy, tokenizer, gold_prompts, gold_specs, args, device)
            result["gold_sampled/score"], result["gold_sampled/score_se"] = mean_and_se(sampled)
            result.update(family_scores(gold_specs, sampled, "gold_sampled"))
            result["gold_sampled/samples"], result["gold_sampled/temperature"] = args.samples, args.temperature
            result["per_prompt"]["gold_sampled"] = sampled
            if reference is not None:
                phase(f"sampled responses of the reference: {args.samples} per prompt")
                ref_sampled = sampled_gold(reference, ref_tok, gold_prompts, gold_specs, args, device)
                result.update(paired("gold_sampled", sampled, ref_sampled))
    rm_scores = ref_rm = None
    if args.reward_model:

        scorer = RewardScorer(args.reward_model, normalize=args.normalize, trust_remote_code=args.trust_remote_code)

        def rm_score(outs: list[str]) -> list[float]:

            seqs = [sequence_ids(scorer.tokenizer, p, o, scorer.max_length, scorer.max_prompt_length)
                    for p, o in zip(prompts, outs)]
            return scorer.score_batched(seqs, args.batch_size)

        phase("reward-model scores")
        rm_scores = rm_score(texts)
        result["rm/score"], result["rm/score_se"] = mean_and_se(rm_scores)
        if ref_texts:
            ref_rm = rm_score(ref_texts)

    # 3. Win rate against the reference, by each judge available.
    if ref_texts:
        if gold:
            result.update({f"win/gold/{k}": v for k, v in win_rate(gold, ref_gold).items()})
        if rm_scores is not None:
            result.update({f"win/rm/{k}": v for k, v in win_rate(rm_scores, ref_rm).items()})

    # 4. KL(policy || reference) on responses sampled from the policy.
    if reference is not None:
        phase("KL to the reference: sampled responses of the policy, scored by both")
        torch.manual_seed(args.seed)
        sampled = generate_ids(policy, tokenizer, prompts, args.max_new_tokens, args.batch_size, device,
                               temperature=1.0)
        lp = continuation_logprobs(policy, prompt_ids, sampled, tokenizer.pad_token_id, args.batch_size)
        lr = continuation_logprobs(reference, prompt_ids, sampled, tokenizer.pad_token_id, args.batch_size)
        kls = [float((a - b).sum()) for a, b in zip(lp, lr)]
        result["objective/kl"], result["objective/kl_se"] = mean_and_se(kls)

    # 5. Length and end-of-turn share of the greedy responses.
    result["response/length"] = sum(len(r) for r in responses) / len(responses)
    result["response/eos_share"] = sum(bool(r) and r[-1] in stops for r in responses) / len(responses)
    if ref_responses is not None:
        result["reference/response_length"] = sum(len(r) for r in ref_responses) / len(ref_responses)

    # 6. Forgetting: per-token NLL on general text, policy against its base.
    paragraphs = general_paragraphs(args.forgetting_text)
    phase(f"forgetting check: NLL on {len(paragraphs)} paragraphs of general text")
    result["forgetting/nll_policy"] = text_nll(policy, tokenizer, paragraphs)
    base_path = args.base or args.reference
    if base_path:
        if base_path == args.reference:
            base = reference
        else:
            base, base_tok = _load_policy(base_path, args.trust_remote_code)
            _same_vocabulary(base_tok, tokenizer, f"--base {base_path}")
        result["forgetting/nll_base"] = text_nll(base, tokenizer, paragraphs)
        result["forgetting/nll_change"] = result["forgetting/nll_policy"] - result["forgetting/nll_base"]
    result["forgetting/paragraphs"] = len(paragraphs)

    # 7. Samples.
    samples = []
    for i in range(min(SAMPLES_SHOWN, len(rows))):
        sample = {"id": rows[i].data.get("id", rows[i].origin), "prompt": prompts[i][-1]["content"],
                  "policy": texts[i]}
        if golds[i]:
            sample["gold_policy"] = task.score(golds[i], texts[i])
        if rm_scores is not None:
            sample["rm_policy"] = rm_scores[i]
        if ref_texts:
            sample["reference"] = ref_texts[i]
            if golds[i]:
                sample["gold_reference"] = task.score(golds[i], ref_texts[i])
            if ref_rm is not None:
                sample["rm_reference"] = ref_rm[i]
        samples.append(sample)
    result["samples"] = samples
    result["seconds"] = time.time() - started
    return result


# ---------------------------------------------------------------------------
# Reward-model evaluation
# ---------------------------------------------------------------------------

def evaluate_reward_model(args) -> dict:

    started = time.time()
    scorer = RewardScorer(args.reward_model, trust_remote_code=args.trust_remote_code)
    rows = read_rows(args.pairs)[: args.num_prompts or None]
    pairs, categories, dropped = [], [], {}
    for row in rows:
        try:
            pairs.append(to_pair(row))
        except PairRejected as exc:  # counted and reported, never silently lost
            dropped[str(exc)] = dropped.get(str(exc), 0) + 1
            continue
        categories.append(row.data.get("category"))
    if not pairs:
        raise DataError(f"{args.pairs}: no usable preference pairs ({dropped or 'no rows'})")

    def ids(p, response):
        return sequence_ids(scorer.tokenizer, p.prompt, response, scorer.max_length, scorer.max_prompt_length)

    def response_tokens(response) -> int:  # the length bias is about responses, as in training's eval
        return len(scorer.tokenizer(_plain(response), add_special_tokens=False)["input_ids"])

    chosen_ids = [ids(p, p.chosen) for p in pairs]
    rejected_ids = [ids(p, p.rejected) for p in pairs]
    chosen = torch.tensor(scorer.score_batched(chosen_ids, args.batch_size))
    rejected = torch.tensor(scorer.score_batched(rejected_ids, args.batch_size))
    report = reward_report(chosen, rejected, torch.tensor([response_tokens(p.chosen) for p in pairs]),
                           torch.tensor([response_tokens(p.rejected) for p in pairs]))
    result = {"reward_model": str(args.reward_model), "pairs": str(args.pairs), "rows": len(rows),
              "dropped": dropped, **{k.replace("eval/", "rm/"): v for k, v in report.items()}}
    for name in sorted({c for c in categories if c is not None}):
        idx = [i for i, c in enumerate(categories) if c == name]
        result[f"rm/accuracy/{name}"] = pairwise_accuracy(chosen[idx], rejected[idx])
        result[f"rm/pairs/{name}"] = len(idx)
    result["samples"] = [{"prompt": _shown(p.prompt, 300, tail=True), "chosen": _shown(p.chosen, 300),
                          "rejected": _shown(p.rejected, 300), "reward_chosen": float(c), "reward_rejected": float(r)}
                         for p, c, r in list(zip(pairs, chosen, rejected))[:SAMPLES_SHOWN]]
    result["seconds"] = time.time() - started
    return result


def _shown(value, limit: int, tail: bool = False):
    """A prompt or response for the samples: text cut to `limit` characters (its end when `tail`), a message list
    kept as messages (the report shows them as turns) with each content cut the same way."""

    def cut(text: str) -> str:
        if len(text) <= limit:
            return text
        return "…" + text[-limit:] if tail else text[:limit] + "…"

    if isinstance(value, list):
        return [{**m, "content": cut(_plain([m]))} if isinstance(m, dict) else cut(str(m)) for m in value]
    return cut(str(value))


def _plain(response) -> str:
    if isinstance(response, list):
        return "".join(str(m.get("content", "")) for m in response if isinstance(m, dict))
    return str(response)


def main(args) -> int:
    if not args.policy and not (args.reward_model and args.pairs):
        print("error: align eval needs --policy, or --reward-model with --pairs", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = evaluate_policy(args) if args.policy else evaluate_reward_model(args)
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")

    report = write_eval_report(out, result)
    for key, value in result.items():
        if isinstance(value, float):
            print(f"{key:32s} {value:.4f}")
    print(f"wrote {out / 'eval.json'} and {report}")
    return 0
