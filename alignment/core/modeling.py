"""Forward passes shared by the stages: log-probs computed only where they are needed.

A causal LM's output layer is the most expensive matmul for small models with
large vocabularies (SmolLM2: 576 x 49152). We run the decoder once, then apply the
output layer only at positions whose next token is a target, in fp32 for the
log-softmax, in chunks so that extra memory stays near one chunk of logits.

A batch may carry `logit_temperature` (a float T > 0): log-probs (and entropies) are then those of
softmax(logits / T), the distribution a rollout sampled at temperature T draws from, so that online RL
trains and regularises the policy it samples (as TRL's GRPOTrainer and verl do).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignment.core.data import IGNORE

LOGIT_CHUNK = 4096  # target positions per output-layer chunk


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


def _scaled(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """fp32 logits, divided by the batch's sampling temperature when it carries one."""
    temperature = batch.get("logit_temperature")
    logits = logits.float()
    return logits / temperature if temperature else logits


def _target_logprobs(model, batch: dict, with_entropy: bool = False):
    hidden = _last_hidden(model, batch)
    labels = batch["labels"]
    targets = labels[:, 1:]
    where = (targets != IGNORE).nonzero(as_tuple=False)  # [N, 2] (row, t) -> predicts labels[row, t+1]
    head = unwrap(model).get_output_embeddings()
    picked = hidden[:, :-1][where[:, 0], where[:, 1]]
    target_ids = targets[where[:, 0], where[:, 1]]
    logps, entropies = [], []
    for start in range(0, picked.shape[0], LOGIT_CHUNK):
        log_probs = F.log_softmax(_scaled(head(picked[start : start + LOGIT_CHUNK]), batch), dim=-1)
        logps.append(torch.gather(log_probs, 1, target_ids[start : start + LOGIT_CHUNK, None])[:, 0])
        if with_entropy:
            entropies.append(-(log_probs.exp() * log_probs).sum(dim=-1))
    empty = hidden.new_zeros(0, dtype=torch.float32)
    logp = torch.cat(logps) if logps else empty
    where = where.clone()
    where[:, 1] += 1
    if with_entropy:
        return logp, where, (torch.cat(entropies) if entropies else empty)
    return logp, where


def _predicted_logprobs(model, batch: dict, with_entropy: bool = False):
    """Log-probs of batch["targets"] [N] read at batch["pred_index"] [N, 2] (row, position), for packed rows
    whose targets do not sit one position after their predictor (alignment.rlhf.rollout.group_batch)."""
    hidden = _last_hidden(model, batch)
    where = batch["pred_index"]
    picked = hidden[where[:, 0], where[:, 1]]
    target_ids = batch["targets"]
    head = unwrap(model).get_output_embeddings()
    logps, entropies = [], []
    for start in range(0, picked.shape[0], LOGIT_CHUNK):
        log_probs = F.log_softmax(_scaled(head(picked[start : start + LOGIT_CHUNK]), batch), dim=-1)
        logps.append(torch.gather(log_probs, 1, target_ids[start : start + LOGIT_CHUNK, None])[:, 0])
        if with_entropy:
            entropies.append(-(log_probs.exp() * log_probs).sum(dim=-1))
    empty = hidden.new_zeros(0, dtype=torch.float32)
    logp = torch.cat(logps) if logps else empty
    return (logp, torch.cat(entropies) if entropies else empty) if with_entropy else (logp,)


def response_logprobs(model, batch: dict, with_entropy: bool = False):
    """Log-prob of every response token [B, T] (0 off the response), and its entropy [B, T] when asked.

    batch: right-padded prompt + response rows with `labels` on the response tokens and
    `response_start` [B] (each row's prompt length; alignment.rlhf.rollout.episode_batch), or
    groups packed with their prompt once (`pred_index`, `targets`, `target_slot`; group_batch).
    T = the longest response. With batch["logit_temperature"] = T_s, the log-probs of softmax(logits / T_s).
    """
    if "pred_index" in batch:
        out = call(model, _predicted_logprobs, batch, with_entropy)
        slot = batch["target_slot"]
        dense = torch.zeros(batch["response_mask"].shape, dtype=out[0].dtype, device=out[0].device)
        dense = dense.index_put((slot[:, 0], slot[:, 1]), out[0])
        if not with_entropy:
            return dense
        return dense, torch.zeros_like(dense).index_put((slot[:, 0], slot[:, 1]), out[1])
    out = call(model, _target_logprobs, batch, with_entropy)
    logp, where = out[0], out[1]
    start = batch["response_start"]
    T = int(batch["response_mask"].shape[1])
    rows, cols = where[:, 0], where[:, 1] - start[where[:, 0]]
    dense = torch.zeros(start.shape[0], T, dtype=logp.dtype, device=logp.device)
    dense = dense.index_put((rows, cols), logp)
    if not with_entropy:
        return dense
    entropy = torch.zeros_like(dense).index_put((rows, cols), out[2])
    return dense, entropy


def sequence_logprobs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of target log-probs per sequence: ([S], [S]).

    A sequence is a row, or for packed batches a segment named by batch["sequence_index"].
    """
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
