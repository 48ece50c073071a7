"""Gold score: generate answers to held-out built-in task prompts and score them with the verifier.

Runs on a plain transformers model (the exported `final/` directory or the base
model), sharded across ranks, greedy decoding, left padding. Reports the mean
gold reward (alignment.evaluate.task.score) and the exact-answer rate.
"""

from __future__ import annotations

from pathlib import Path

import torch

from alignment.evaluate import task
from alignment.core.data import read_rows


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int,
             device: torch.device, samples: int = 1, temperature: float = 0.0) -> list[str]:
    """Completions for chat prompts (lists of messages), `samples` per prompt in prompt order.

    temperature 0: greedy; above 0: plain temperature sampling (no top-k/top-p), seeded by
    the caller through torch's global generator.
    """
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 \
        else {"do_sample": False}
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from each prompt's last real token
    outputs = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                     for p in prompts[start : start + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, num_return_sequences=samples, **sampling,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            for row in out[:, enc["input_ids"].shape[1]:]:
                outputs.append(tokenizer.decode(row, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
    return outputs


def gold_score(engine, model_dir: str, prompts_source: str, num_prompts: int, max_new_tokens: int,
               batch_size: int) -> dict[str, float]:
    """Mean gold reward of a saved model on the first `num_prompts` prompts; every rank calls."""
    from alignment.core.export import load_exported
    from alignment.core.models import load_tokenizer

    rows = read_rows(prompts_source)[:num_prompts]
    mine = rows[engine.dist.rank :: engine.dist.world_size]
    tokenizer = load_tokenizer(model_dir)
    with engine.plain_init():
        model = load_exported(model_dir, "causal_lm").to(engine.dist.device).eval()
    responses = generate(model, tokenizer, [r.data["prompt"] for r in mine], max_new_tokens, batch_size, engine.dist.device)
    scores = [task.score(r.data["gold"], resp) for r, resp in zip(mine, responses)]
    sums = engine.dist.reduce_sums({"score": sum(scores), "exact": sum(s == 1.0 for s in scores), "n": len(scores)})
    n = max(1.0, sums["n"])
    return {"gold/score": sums["score"] / n, "gold/exact": sums["exact"] / n, "gold/n": sums["n"],
            "_examples": list(zip([r.data["prompt"][-1]["content"] for r in mine[:3]], responses[:3]))}


def gold_eval(engine, model_dir: str, cfg) -> dict:
    result = gold_score(engine, model_dir, cfg.prompts, cfg.num_prompts, cfg.max_new_tokens, cfg.batch_size)
    examples = result.pop("_examples")
    if engine.dist.is_main:
        print(f"gold score of {Path(model_dir).name}: {result['gold/score']:.3f} (exact {result['gold/exact']:.3f})")
        for prompt, response in examples[:2]:
            print(f"  Q: {prompt!r}\n  A: {response!r}")
    return result
