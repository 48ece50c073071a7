"""Generation from chat prompts, and the gold score: answers to held-out built-in task prompts scored
with the verifier.

Generation starts from the prompt ids of the one tokenization path (alignment.data.text),
left-padded, and stops at the template's end-of-turn token, so a response is the very ids
training puts after its prompt. The gold score runs on a plain transformers model (the
exported `final/` directory or the base model), sharded across ranks, greedy decoding, and
reports the mean gold reward (alignment.builtin.task.score) and the exact-answer rate.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from alignment.builtin import task
from alignment.core.export import load_exported
from alignment.core.fingerprint import file_fingerprint, model_fingerprint
from alignment.core.models import cache_dir, load_tokenizer
from alignment.data import text
from alignment.data.sources import read_rows, resolve_source


def generation_batch(tokenizer, prompts: list, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Left-padded prompt ids (alignment.data.text.prompt_ids: the ids training puts before a response)."""
    rows = [text.prompt_ids(tokenizer, p) for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def response_until_stop(ids: list[int], stops: set[int]) -> list[int]:
    """A generated row cut after its first stop token (what follows is padding)."""
    for i, token in enumerate(ids):
        if token in stops:
            return ids[: i + 1]
    return ids


@torch.no_grad()
def generate_ids(model, tokenizer, prompts: list, max_new_tokens: int, batch_size: int, device: torch.device,
                 samples: int = 1, temperature: float = 0.0, logits_processor=None) -> list[list[int]]:
    """Response ids for prompts (chat message lists or raw text), `samples` per prompt in prompt order,
    each ending with its stop token (text.stop_token_ids) unless max_new_tokens cut it.

    temperature 0: greedy; above 0: plain temperature sampling (no top-k/top-p), seeded by the
    caller through torch's global generator.
    """
    sampling = ({"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0
                else {"do_sample": False})
    stops = text.stop_token_ids(tokenizer)
    out_rows: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        batch = generation_batch(tokenizer, prompts[start : start + batch_size], device)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, num_return_sequences=samples, **sampling,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=stops,
                             logits_processor=logits_processor)
        for row in out[:, batch["input_ids"].shape[1]:].tolist():
            out_rows.append(response_until_stop(row, set(stops)))
    return out_rows


def generate(model, tokenizer, prompts: list, max_new_tokens: int, batch_size: int,
             device: torch.device, samples: int = 1, temperature: float = 0.0) -> list[str]:
    """Completions as text (special tokens dropped); see generate_ids."""
    rows = generate_ids(model, tokenizer, prompts, max_new_tokens, batch_size, device, samples, temperature)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in rows]


def gold_score(engine, model_dir: str, prompts_source: str, num_prompts: int, max_new_tokens: int,
               batch_size: int, *, trust_remote_code: bool = False, revision: str | None = None,
               tokenizer_path: str | None = None, samples: int = 0, temperature: float = 1.0) -> dict[str, float]:
    """Mean gold reward of a model (a directory or hub id at `revision`) on the first `num_prompts` prompts;
    every rank calls."""

    tokenizer = load_tokenizer(tokenizer_path or model_dir, trust_remote_code, None if tokenizer_path else revision)
    with engine.plain_init():
        model = load_exported(model_dir, "causal_lm", trust_remote_code=trust_remote_code,
                              revision=revision).to(engine.dist.device).eval()
    return gold_score_of_model(engine, model, tokenizer, prompts_source, num_prompts, max_new_tokens, batch_size,
                               samples, temperature)


def gold_score_of_model(engine, model, tokenizer, prompts_source: str, num_prompts: int, max_new_tokens: int,
                        batch_size: int, samples: int = 0, temperature: float = 1.0, seed: int = 0) -> dict:
    """gold_score of a model already in memory (e.g. a stage's policy inside engine.generation_view): the mean
    gold score of its greedy answers, overall (gold/score) and by family (gold/<family>), and with `samples` also
    of that many answers per prompt sampled at `temperature` (gold_sampled/*: the score sampling optimises)."""
    rows = read_rows(prompts_source)[:num_prompts]
    families = sorted({fam for r in rows for fam in families_of(r.data["gold"])})
    mine = rows[engine.dist.rank :: engine.dist.world_size]
    prompts, golds = [r.data["prompt"] for r in mine], [r.data["gold"] for r in mine]
    responses = generate(model, tokenizer, prompts, max_new_tokens, batch_size, engine.dist.device)
    scores = [task.score(g, resp) for g, resp in zip(golds, responses)]
    sums = {"score": sum(scores), "exact": sum(s == 1.0 for s in scores), "n": len(scores),
            **family_sums(golds, scores, families, "")}
    if samples:
        torch.manual_seed(seed)
        sampled = generate(model, tokenizer, prompts, max_new_tokens, batch_size, engine.dist.device, samples,
                           temperature)
        per_prompt = [sum(task.score(g, sampled[i * samples + j]) for j in range(samples)) / samples
                      for i, g in enumerate(golds)]
        sums.update({"sampled": sum(per_prompt), **family_sums(golds, per_prompt, families, "sampled:")})
    sums = engine.dist.reduce_sums(sums)
    n = max(1.0, sums["n"])
    out = {"gold/score": sums["score"] / n, "gold/exact": sums["exact"] / n, "gold/n": sums["n"]}
    for fam in families:
        out[f"gold/{fam}"] = sums[f"{fam}"] / max(1.0, sums[f"{fam}:n"])
        if samples:
            out[f"gold_sampled/{fam}"] = sums[f"sampled:{fam}"] / max(1.0, sums[f"{fam}:n"])
    if samples:
        out["gold_sampled/score"] = sums["sampled"] / n
    out["_samples"] = [{"id": r.data.get("id", r.origin), "prompt": r.data["prompt"][-1]["content"], "response": resp,
                        "score": s} for r, resp, s in zip(mine, responses, scores)]
    return out


def families_of(gold: dict) -> list[str]:
    """The families a gold spec counts in: its own, and constraints_held_out_pair for a pair of constraints no
    training split holds."""
    return [gold.get("family", "other")] + (["constraints_held_out_pair"] if gold.get("held_out_pair") else [])


def family_sums(golds: list[dict], scores: list[float], families: list[str], prefix: str) -> dict:
    """{prefix + family: sum of scores, family + ':n': count} over every family (zeros where a rank has none)."""
    out = {f"{prefix}{fam}": 0.0 for fam in families}
    if not prefix:
        out.update({f"{fam}:n": 0.0 for fam in families})
    for gold, value in zip(golds, scores):
        for fam in families_of(gold):
            out[f"{prefix}{fam}"] += value
            if not prefix:
                out[f"{fam}:n"] += 1
    return out


SAMPLES_KEPT = 16


def gold_cache_key(model_dir: str, revision: str | None, tokenizer_path: str | None, cfg, world_size: int) -> str | None:
    """What a gold score depends on: the model's files (a hub id pinned to its cached commit), the tokenizer's,
    the prompt file's bytes, the decode settings, how the prompts are split into batches (world size, batch
    size: left padding moves greedy numerics) and torch's version. None when the model cannot be pinned."""
    import hashlib


    weights = model_fingerprint(model_dir, revision)
    if weights is None:
        return None
    tokenizer = model_fingerprint(tokenizer_path) if tokenizer_path else ""
    try:
        prompts = file_fingerprint(resolve_source(cfg.prompts))
    except (OSError, ValueError):  # a hub dataset: not pinned
        return None
    parts = [weights, tokenizer or "", prompts, cfg.num_prompts, cfg.max_new_tokens, cfg.batch_size, world_size,
             torch.__version__, getattr(cfg, "samples", 0), getattr(cfg, "temperature", 1.0), "families-v1"]
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:32]


def _read_gold_cache(path: Path | None) -> dict | None:
    try:
        return json.loads(path.read_text()) if path is not None else None
    except (OSError, ValueError):
        return None


def gold_eval(engine, model_dir: str, cfg, model_cfg=None, base: bool = False,
              samples_to: str | Path | None = None) -> dict:
    """Gold score of `model_dir` as a stage's gold_eval section says, printed with two examples.

    `model_cfg` (the recipe's model section) gives trust_remote_code; for the `base` model also its
    revision and tokenizer (an export carries its own). `samples_to`: a JSONL file that gets the first
    SAMPLES_KEPT of the main rank's (prompt, response, score), for the report's side-by-side samples.

    A LoRA export with `merged/` is scored through it: the plain model the next stage of a pipeline starts
    from. Scores are cached (ALIGN_CACHE/gold, keyed by gold_cache_key): a stage's "before" is then its
    parent's "after", not a second generation over the same prompts with the same weights. Every rank must
    hold the entry for a hit, else every rank generates (the score is a collective)."""

    if (Path(model_dir) / "merged" / "config.json").is_file():
        model_dir = str(Path(model_dir) / "merged")
    remote_code = bool(getattr(model_cfg, "trust_remote_code", False))
    revision = getattr(model_cfg, "revision", None) if base else None
    tokenizer_path = getattr(model_cfg, "tokenizer", None) if base else None
    key = gold_cache_key(model_dir, revision, tokenizer_path, cfg, engine.dist.world_size)
    path = cache_dir() / "gold" / f"{key}.json" if key else None
    cached = _read_gold_cache(path)
    hits = engine.dist.reduce_sums({"hit": 1.0 if cached is not None else 0.0})["hit"]
    if cached is not None and hits == engine.dist.world_size:
        result, samples, note = cached["result"], cached["samples"], " (cached: same weights, prompts and decoding)"
    else:
        result = gold_score(engine, model_dir, cfg.prompts, cfg.num_prompts, cfg.max_new_tokens, cfg.batch_size,
                            trust_remote_code=remote_code, revision=revision, tokenizer_path=tokenizer_path,
                            samples=getattr(cfg, "samples", 0), temperature=getattr(cfg, "temperature", 1.0))
        samples, note = result.pop("_samples"), ""
        if path is not None and engine.dist.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            tmp.write_text(json.dumps({"model": model_dir, "result": result, "samples": samples[:SAMPLES_KEPT]}))
            tmp.replace(path)
    if engine.dist.is_main:
        print(f"gold score of {Path(model_dir).name}: {result['gold/score']:.3f} (exact {result['gold/exact']:.3f}){note}")
        families = [k.split("/", 1)[1] for k in result if k.startswith("gold/") and k.split("/", 1)[1] not in
                    ("score", "exact", "n")]
        if families:
            print("  by family (greedy" + (", sampled" if "gold_sampled/score" in result else "") + "): " + ", ".join(
                f"{fam} {result[f'gold/{fam}']:.3f}" + (f" / {result[f'gold_sampled/{fam}']:.3f}"
                                                       if f"gold_sampled/{fam}" in result else "") for fam in families))
        for sample in samples[:2]:
            print(f"  Q: {sample['prompt']!r}\n  A: {sample['response']!r}")
        if samples_to is not None:
            Path(samples_to).parent.mkdir(parents=True, exist_ok=True)
            Path(samples_to).write_text("".join(json.dumps(x) + "\n" for x in samples[:SAMPLES_KEPT]))
    return result
