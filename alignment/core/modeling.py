"""Forward passes shared by the stages: log-probs computed only where they are needed.

A causal LM's output layer is the most expensive matmul for small models with
large vocabularies (SmolLM2: 576 x 49152). We run the decoder once, then apply the
output layer only at positions whose next token is a target, in fp32 for the
log-softmax, in chunks so that extra memory stays near one chunk of logits: under autograd each
chunk is recomputed in backward rather than kept.

A batch may carry `logit_temperature` (a float T > 0): log-probs (and entropies) are then those of
softmax(logits / T), the distribution a rollout sampled at temperature T draws from, so that online RL
trains and regularises the policy it samples (as TRL's GRPOTrainer and verl do).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from alignment.data.layout import IGNORE

LOGIT_CHUNK = 1024  # target positions per output-layer chunk (SmolLM2: 0.2 GB per fp32 copy of its logits)


class Forwarder(torch.nn.Module):
    """What the DeepSpeed engine wraps: `engine(fn, *args)` runs `fn(model, *args)` inside its forward.

    Our forwards are not a plain `model(**batch)` (decoder, then the output layer at chosen
    positions; a scalar head at the last real token), yet DeepSpeed must see every one of
    them through its own forward: that is where ZeRO starts a micro-step and registers the
    backward prologue that gradient accumulation and reduction depend on.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


def user_model(model):
    """The model as the user built it (a transformers or peft model), without engine wrappers."""
    inner = getattr(model, "module", model)  # DeepSpeed engine
    return inner.model if isinstance(inner, Forwarder) else inner


def unwrap(model):
    """The underlying transformers model: strips the engine, the forwarder and peft."""
    inner = user_model(model)
    if hasattr(inner, "get_base_model"):  # peft: LoRA layers are injected in place
        inner = inner.get_base_model()
    return inner


def call(model, fn, *args):
    """Run fn(user model, *args), through the DeepSpeed engine's forward when there is one."""
    if isinstance(getattr(model, "module", None), Forwarder):
        return model(fn, *args)
    return fn(user_model(model), *args)


def attention_inputs(batch: dict, dtype: torch.dtype) -> dict:
    """attention_mask (+position_ids) for the model; packed rows get an additive 4D block mask."""
    if "block_mask" in batch:
        allowed = batch["block_mask"]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return {"attention_mask": mask, "position_ids": batch["position_ids"]}
    out = {"attention_mask": batch["attention_mask"]}
    if "position_ids" in batch:
        out["position_ids"] = batch["position_ids"]
    return out


def model_dtype(model) -> torch.dtype:
    for param in unwrap(model).parameters():
        return param.dtype
    return torch.float32


def _last_hidden(model, batch: dict) -> torch.Tensor:
    """Final hidden states [B, T, H] from the decoder, without the output layer."""
    hf = unwrap(model)
    decoder = hf.get_decoder()
    out = decoder(input_ids=batch["input_ids"], use_cache=False, **attention_inputs(batch, model_dtype(model)))
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def target_logprobs(model, batch: dict):
    """Log-prob of every supervised next token.

    batch["labels"]: [B, T], IGNORE where there is no target. Position t predicts
    labels[t+1]. Returns (logps [N], index [N, 2] of (row, label position)) for the
    N supervised targets, computed in fp32 from the output layer applied to those
    positions only.
    """
    return call(model, _target_logprobs, batch)


def _chunk_logprobs(head, hidden: torch.Tensor, target_ids: torch.Tensor, temperature, entropy: str | None):
    """Log-probs of target_ids [n] under the output layer at hidden [n, H]; with `entropy` ("grad" or
    "value") also the softmax's entropy [n] (else an empty tensor), differentiable only for "grad"."""
    logits = head(hidden).float()
    log_probs = F.log_softmax(logits / temperature if temperature else logits, dim=-1)
    logp = torch.gather(log_probs, 1, target_ids[:, None])[:, 0]
    if entropy is None:
        return logp, logp.new_zeros(0)
    with torch.set_grad_enabled(entropy == "grad" and torch.is_grad_enabled()):
        return logp, -(log_probs.exp() * log_probs).sum(dim=-1)


def _picked_logprobs(model, picked: torch.Tensor, target_ids: torch.Tensor, batch: dict, entropy: str | None):
    """_chunk_logprobs over LOGIT_CHUNK positions at a time, concatenated: (logp [N], entropy [N] or [0]).

    With autograd on, each chunk is recomputed in backward (activation checkpointing of the output
    layer alone): otherwise autograd keeps every chunk's fp32 [n, vocab] log-softmax until backward,
    which for SmolLM2 is 0.2 MB per target token (a quarter of what its 30 decoder layers keep per token).
    The recompute costs one more output-layer matmul over the targets.
    """
    head = unwrap(model).get_output_embeddings()
    temperature = batch.get("logit_temperature")
    recompute = torch.is_grad_enabled() and picked.requires_grad
    logps, entropies = [], []
    for start in range(0, picked.shape[0], LOGIT_CHUNK):
        args = (head, picked[start : start + LOGIT_CHUNK], target_ids[start : start + LOGIT_CHUNK], temperature,
                entropy)
        logp, ent = checkpoint(_chunk_logprobs, *args, use_reentrant=False) if recompute else _chunk_logprobs(*args)
        logps.append(logp)
        entropies.append(ent)
    empty = picked.new_zeros(0, dtype=torch.float32)
    return (torch.cat(logps) if logps else empty), (torch.cat(entropies) if entropy and entropies else empty)


def _target_logprobs(model, batch: dict, entropy: str | None = None):
    hidden = _last_hidden(model, batch)
    labels = batch["labels"]
    targets = labels[:, 1:]
    where = (targets != IGNORE).nonzero(as_tuple=False)  # [N, 2] (row, t) -> predicts labels[row, t+1]
    picked = hidden[:, :-1][where[:, 0], where[:, 1]]
    target_ids = targets[where[:, 0], where[:, 1]]
    logp, entropies = _picked_logprobs(model, picked, target_ids, batch, entropy)
    where = where.clone()
    where[:, 1] += 1
    if entropy:
        return logp, where, entropies
    return logp, where


def _predicted_logprobs(model, batch: dict, entropy: str | None = None):
    """Log-probs of batch["targets"] [N] read at batch["pred_index"] [N, 2] (row, position), for packed rows
    whose targets do not sit one position after their predictor (alignment.data.layout.group_batch)."""
    hidden = _last_hidden(model, batch)
    where = batch["pred_index"]
    picked = hidden[where[:, 0], where[:, 1]]
    logp, entropies = _picked_logprobs(model, picked, batch["targets"], batch, entropy)
    return (logp, entropies) if entropy else (logp,)


def response_logprobs(model, batch: dict, entropy: str | None = None):
    """Log-prob of every response token [B, T] (0 off the response), and its entropy [B, T] when asked.

    batch: right-padded prompt + response rows with `labels` on the response tokens and
    `response_start` [B] (each row's prompt length; alignment.data.layout.episode_batch), or
    groups packed with their prompt once (`pred_index`, `targets`, `target_slot`; group_batch).
    T = the longest response. With batch["logit_temperature"] = T_s, the log-probs of softmax(logits / T_s).
    entropy: None, "value" (for logging: no gradient, nothing kept for backward) or "grad" (an entropy bonus).
    """
    if "pred_index" in batch:
        out = call(model, _predicted_logprobs, batch, entropy)
        slot = batch["target_slot"]
        dense = torch.zeros(batch["response_mask"].shape, dtype=out[0].dtype, device=out[0].device)
        dense = dense.index_put((slot[:, 0], slot[:, 1]), out[0])
        if not entropy:
            return dense
        return dense, torch.zeros_like(dense).index_put((slot[:, 0], slot[:, 1]), out[1])
    out = call(model, _target_logprobs, batch, entropy)
    logp, where = out[0], out[1]
    start = batch["response_start"]
    T = int(batch["response_mask"].shape[1])
    rows, cols = where[:, 0], where[:, 1] - start[where[:, 0]]
    dense = torch.zeros(start.shape[0], T, dtype=logp.dtype, device=logp.device)
    dense = dense.index_put((rows, cols), logp)
    if not entropy:
        return dense
    return dense, torch.zeros_like(dense).index_put((rows, cols), out[2])


def sequence_logprobs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of target log-probs per sequence: ([S], [S]).

    A sequence is a row, or for packed batches a segment named by batch["sequence_index"].
    """
    if "target_owner" in batch:  # shared-prefix rows (alignment.data.layout.shared_pairs_rows)
        logp = call(model, _predicted_logprobs, batch)[0]
        owner, n = batch["target_owner"], batch["num_sequences"]
        total = torch.zeros(n, dtype=torch.float32, device=logp.device).index_add(0, owner, logp)
        count = torch.zeros(n, dtype=torch.float32, device=logp.device).index_add(0, owner, torch.ones_like(logp))
        return total, count
    logp, where = target_logprobs(model, batch)
    if "sequence_index" in batch:
        owner = batch["sequence_index"][where[:, 0], where[:, 1]]
        n = batch["num_sequences"]
    else:
        owner, n = where[:, 0], batch["input_ids"].shape[0]
    total = torch.zeros(n, dtype=torch.float32, device=logp.device).index_add(0, owner, logp)
    count = torch.zeros(n, dtype=torch.float32, device=logp.device).index_add(0, owner, torch.ones_like(logp))
    return total, count


def full_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plain forward through the whole model (used for export checks)."""
    return call(model, lambda m, ids, mask: m(input_ids=ids, attention_mask=mask, use_cache=False).logits,
                input_ids, attention_mask)
