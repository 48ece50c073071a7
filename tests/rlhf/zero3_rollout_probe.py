"""Run on 2 ranks (torchrun) by tests/rlhf/test_zero3_rollout.py: decoding under ZeRO-3.

Writes OUT/rank{r}.json: all-gathers counted while decoding with and without the engine's
generation view, response lengths when the ranks stop at different steps, and the greedy tokens.
"""

import json
import sys

import torch
import torch.distributed as dist

from alignment.data import text
from alignment.core.config import DeepSpeedConfig, TrainConfig
from alignment.core.engine import Engine
from alignment.core.models import load_model, load_tokenizer, resolve_model_path
from alignment.rlhf.rollout import sample_batch

PROMPTS = [[{"role": "user", "content": "What is 7 + 5?"}], [{"role": "user", "content": "Spell 'garden' backwards."}]]
GATHERS = {"n": 0}


def counting(fn):
    def wrapped(*args, **kwargs):
        GATHERS["n"] += 1
        return fn(*args, **kwargs)
    return wrapped


for name in ("all_gather_into_tensor", "all_gather", "_all_gather_base"):
    if hasattr(dist, name):
        setattr(dist, name, counting(getattr(dist, name)))


class ForcedStop(torch.nn.Module):
    """A model whose output layer emits EOS at decoding step `at` (1-based) for every row; None bans EOS."""

    def __init__(self, inner, eos, at):
        super().__init__()
        from alignment.core.modeling import unwrap

        self.inner, self.eos, self.at, self.calls = unwrap(inner), eos, at, 0
        self.head = self.inner.get_output_embeddings()

    def get_decoder(self):
        return self.inner.get_decoder()

    def get_output_embeddings(self):
        return self.forcing

    def forcing(self, hidden):
        self.calls += 1
        logits = self.head(hidden).clone()
        logits[:, self.eos] = 1e4 if self.at is not None and self.calls == self.at else -1e4
        return logits


def decode(model, tok, ids, new_tokens, at=None):
    forced = ForcedStop(model, tok.eos_token_id, at)
    before = GATHERS["n"]
    out = sample_batch(forced, ids, [1, 2], max_new_tokens=new_tokens, stop_ids=[tok.eos_token_id],
                       pad_id=tok.pad_token_id, temperature=0.0)
    return GATHERS["n"] - before, out


def main(out_dir: str) -> None:
    engine = Engine(TrainConfig(global_batch_size=2, micro_batch_size=1, precision="fp32"),
                    DeepSpeedConfig(zero_stage=3), seed=0)
    rank = engine.dist.rank
    tok = load_tokenizer(resolve_model_path("tiny-llama"))
    path = f"{out_dir}/model"  # tiny-llama with larger weights, so greedy paths differ per prompt and step
    if rank == 0:
        scaled = load_model(resolve_model_path("tiny-llama"))
        with torch.no_grad():
            for param in scaled.parameters():
                param.mul_(4.0)
        scaled.save_pretrained(path)
    engine.dist.barrier()
    ids = [text.prompt_ids(tok, p) for p in PROMPTS]
    with engine.model_init():
        model = load_model(path)
    prepared = engine.prepare(model, total_steps=1)
    facts = {}
    from alignment.core.modeling import user_model

    # Hooks on (what not to do): ZeRO gathers at every decoding step, so the count grows with the length.
    facts["hooked"] = [decode(user_model(prepared), tok, ids, n)[0] for n in (4, 8)]
    with engine.generation_view(prepared) as policy:
        facts["viewed"] = [decode(policy, tok, ids, n)[0] for n in (4, 16)]
        _, stopped = decode(policy, tok, ids, 10, at=2 if rank == 0 else 6)  # ranks stop at different steps
        facts["stopped_lengths"] = [len(r) for r in stopped.response_ids]
        facts["greedy"] = sample_batch(policy, ids, [1, 2], max_new_tokens=12, stop_ids=text.stop_token_ids(tok),
                                       pad_id=tok.pad_token_id, temperature=0.0).response_ids
    with engine.plain_init():
        plain = load_model(path).eval()  # the same weights, unsharded, in this process
    facts["greedy_unsharded"] = sample_batch(plain, ids, [1, 2], max_new_tokens=12, stop_ids=text.stop_token_ids(tok),
                                             pad_id=tok.pad_token_id, temperature=0.0).response_ids
    # Training still works after decoding (the hooks are back).
    from alignment.core.modeling import full_logits

    logits = full_logits(prepared, torch.tensor([ids[0]]), torch.ones(1, len(ids[0]), dtype=torch.long))
    facts["after_finite"] = bool(torch.isfinite(logits).all())
    with open(f"{out_dir}/rank{rank}.json", "w") as handle:
        json.dump(facts, handle)
    engine.close()


if __name__ == "__main__":
    main(sys.argv[1])
