"""Episodes between sampling and the update: which prompts an iteration takes, each episode's seed, the layout
the training pass reads, forward passes in chunks, the whole rollout gathered on every rank, and dynamic
sampling's choice of groups.

Every rank samples its share of an iteration's prompts, then holds the whole rollout (gather_rollout), so the
advantage math and the minibatches are the same for any number of ranks.
"""

from __future__ import annotations

import random

import torch

from alignment.data.layout import episode_batch, group_batch
from alignment.rlhf.rollout import Rollout, is_tempered


def rollout_prompts(num_prompts: int, per_rollout: int, iteration: int, seed: int) -> list[int]:
    """Prompt indices of iteration `iteration` (1-based): consecutive slices of seeded epoch orders."""
    start = (iteration - 1) * per_rollout
    out = []
    while len(out) < per_rollout:
        epoch, offset = divmod(start + len(out), num_prompts)
        order = list(range(num_prompts))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.append(order[offset])
    return out


def episode_seed(seed: int, iteration: int, prompt: int, sample: int) -> int:
    """The sampling seed of one episode: the same whichever rank or batch samples it."""
    return (((seed * 1_000_003 + iteration) * 1_000_003 + prompt) * 1_009 + sample) % (2**62)


def micro_slices(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def training_layout(prompt_ids, response_ids, group: int, pad_id: int, device, temperature: float = 1.0) -> dict:
    """Episodes as the training pass reads them: groups packed with their prompt once (group > 1), or a row each.
    A sampling temperature other than 1 (and 0, greedy) makes the log-probs read from them those of
    softmax(logits / temperature): the distribution the rollout drew from."""
    batch = (group_batch(prompt_ids, response_ids, group, pad_id, device) if group > 1
             else episode_batch(prompt_ids, response_ids, pad_id, device))
    if is_tempered(temperature):
        batch["logit_temperature"] = float(temperature)
    return batch


@torch.no_grad()
def forward_in_chunks(fn, prepared, rollout: Rollout, pad_id: int, device, micro: int, group: int = 1,
                      temperature: float = 1.0) -> torch.Tensor:
    """fn(model, batch) -> [b, T_b] over this rank's episodes in chunks (whole groups), padded to the longest
    response."""
    T = max(1, max(len(r) for r in rollout.response_ids))
    outs = []
    for s in micro_slices(len(rollout), micro):
        batch = training_layout(rollout.prompt_ids[s], rollout.response_ids[s], group, pad_id, device, temperature)
        values = fn(prepared, batch).float().cpu()
        outs.append(torch.nn.functional.pad(values, (0, T - values.shape[1])))
    return torch.cat(outs) if outs else torch.zeros(0, T)


def gather_rollout(engine, local: dict) -> dict:
    """Every rank's episodes, concatenated in rank order, on every rank (tensors padded to one width)."""
    parts = engine.dist.gather_objects(local)
    out: dict = {}
    for key in local:
        values = [p[key] for p in parts]
        if torch.is_tensor(values[0]) and values[0].dim() == 2:
            width = max(v.shape[1] for v in values)
            out[key] = torch.cat([torch.nn.functional.pad(v, (0, width - v.shape[1])) for v in values])
        elif torch.is_tensor(values[0]):
            out[key] = torch.cat(values)
        else:
            out[key] = [x for v in values for x in v]
    return out


def informative_groups(scores: torch.Tensor, group_size: int, keep: int) -> list[int]:
    """Episode indices of `keep` groups (adjacent runs of group_size): those whose scores differ first, in
    order, then tied ones."""
    spread = scores.view(-1, group_size).std(dim=1) > 0 if group_size > 1 else torch.ones(len(scores), dtype=torch.bool)
    order = [g for g in range(len(spread)) if spread[g]] + [g for g in range(len(spread)) if not spread[g]]
    return [g * group_size + k for g in sorted(order[:keep]) for k in range(group_size)]


