"""Reward-model forward: a scalar read at each sequence's last real token.

The index of the last real token comes from the attention mask, never from
searching for the pad id (FAILURES rows 8, 9: pad == eos and left padding both
break pad-id searches). Position ids are derived from the mask too, so a sequence
scores the same alone, right-padded and left-padded in a batch.
"""

from __future__ import annotations

import torch

from alignment.core.modeling import attention_inputs, call, model_dtype, unwrap
from alignment.data.layout import predicting_positions


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] index of the last position with mask 1 (works for left and right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(dim=-1)


def score_head(hf_model):
    for name in ("score", "classifier", "v_head"):
        head = getattr(hf_model, name, None)
        if head is not None:
            return head
    raise AttributeError(f"{type(hf_model).__name__} has no scalar head (score/classifier)")


def sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Rewards [B] (fp32) for sequences [B, T]."""
    return call(model, _sequence_rewards, input_ids, attention_mask)


def _sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    hf = unwrap(model)
    backbone = getattr(hf, hf.base_model_prefix)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    picked = hidden[rows, last_token_index(attention_mask)]
    return score_head(hf)(picked.to(model_dtype(model))).squeeze(-1).float()


def token_values(model, batch: dict) -> torch.Tensor:
    """A critic's values over response tokens [B, T]: V(s_t) for the state before response token t, read at
    the position that predicts it (the prompt's last token for t = 0; FAILURES row 25). `batch` as
    alignment.data.layout.episode_batch lays it out; 0 off the response."""
    return call(model, _token_values, batch)


def _backbone_hidden(model, batch: dict) -> torch.Tensor:
    """Final hidden states [B, T, H] of a scalar-head model's backbone (padded or packed batch)."""
    hf = unwrap(model)
    backbone = getattr(hf, hf.base_model_prefix)
    out = backbone(input_ids=batch["input_ids"], use_cache=False, **attention_inputs(batch, model_dtype(model)))
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _token_values(model, batch: dict) -> torch.Tensor:
    hf = unwrap(model)
    hidden = _backbone_hidden(model, batch)
    if "pred_index" in batch:  # groups packed with their prompt once (alignment.data.layout.group_batch)
        where, slot = batch["pred_index"], batch["target_slot"]
        values = score_head(hf)(hidden[where[:, 0], where[:, 1]].to(model_dtype(model))).squeeze(-1).float()
        dense = torch.zeros(batch["response_mask"].shape, dtype=values.dtype, device=values.device)
        return dense.index_put((slot[:, 0], slot[:, 1]), values)
    response_mask = batch["response_mask"]
    B, T = response_mask.shape
    where = predicting_positions(batch["response_start"], T).clamp(max=hidden.shape[1] - 1)
    picked = hidden[torch.arange(B, device=hidden.device)[:, None], where]  # [B, T, H]
    return score_head(hf)(picked.to(model_dtype(model))).squeeze(-1).float() * response_mask


def batch_rewards(model, batch: dict) -> torch.Tensor:
    """Rewards [S] for a collated batch: padded rows, or packed segments (alignment.data.layout.collate_pairs)."""
    if "last_position" not in batch:
        return sequence_rewards(model, batch["input_ids"], batch["attention_mask"])
    return call(model, _packed_rewards, batch)


def _packed_rewards(model, batch: dict) -> torch.Tensor:
    hidden = _backbone_hidden(model, batch)
    last = batch["last_position"]
    return score_head(unwrap(model))(hidden[last[:, 0], last[:, 1]]).squeeze(-1).float()


def _spare_token(tokenizer) -> str | None:
    """A token of the vocabulary that can serve as padding: not EOS or BOS, and not one the chat template
    writes (a pad id inside real text would end transformers' pooling early)."""
    rendered = ""
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": "a"}, {"role": "assistant",
                                                  "content": "b"}], tokenize=False)
    added = [tok.content for tok in getattr(tokenizer, "added_tokens_decoder", {}).values() if tok.special]
    named = sorted(added, key=lambda tok: ("pad" not in tok.lower(), "reserved" not in tok.lower()))
    vocab = tokenizer.get_vocab()
    for token in [tokenizer.unk_token, "<|endoftext|>", "<pad>", "<|pad|>", *named, *tokenizer.all_special_tokens]:
        if token and token in vocab and token not in (tokenizer.eos_token, tokenizer.bos_token) and token not in rendered:
            return token
    return None


def ensure_distinct_pad(tokenizer, model) -> None:
    """Give the tokenizer a pad token distinct from EOS and record it in the model config.

    Our scoring never needs this (it uses the attention mask), but transformers'
    own AutoModelForSequenceClassification pooling finds the last token by pad id:
    with pad == eos it would read the reward one token early. A distinct pad makes the
    exported model score the same under plain transformers. Without a spare token in the
    vocabulary (Llama-3 has neither pad nor unk), a `<|pad|>` token is added and the
    embeddings grow by one row, which no real token ever reads.
    """
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        spare = _spare_token(tokenizer)
        if spare is not None:
            tokenizer.pad_token = spare
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
            unwrap(model).resize_token_embeddings(len(tokenizer))
    config = unwrap(model).config
    config.pad_token_id = tokenizer.pad_token_id
