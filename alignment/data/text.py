"""One tokenization path: how a conversation becomes token ids, for every stage.

Training (SFT, reward models, DPO, PPO's update pass), scoring (`align score`, the reward-model
judge of `align pairs`, PPO's reward) and generation (gold scoring, `align pairs`, the PPO
rollout) build their ids here, so one (prompt, response) is the same ids everywhere.

1. Rendering. A chat prompt (a message list) goes through the tokenizer's chat template: the
   prompt with the generation prompt is what generation continues from; the whole conversation
   is the standard rendering. A raw-text prompt (a string) is followed by the response and, when
   the response does not end with it, EOS.
2. BOS. Exactly one BOS at position 0 when the tokenizer adds one by itself (as `tokenizer(text)`
   does), none when it does not; a template that writes the BOS text itself gets no second one.
3. Segments. The rendered text is cut at its prompt/response boundaries and tokenized so that the
   ids up to a boundary are those of the text up to it, tokenized alone: the prompt's ids are
   exactly what generation starts from, and the response's ids exactly what it must produce. When
   a token would merge across a boundary (a prompt ending in a space, SentencePiece-style), the
   piece after it is tokenized on its own; the row is counted as re-split.
4. End of turn. The response runs up to and including the template's end-of-turn token (the
   assistant turn without trailing whitespace): where generation stops and policy log-probs end.
   Template text after it (ChatML's newline) is the suffix. It is part of the standard rendering,
   so a reward model reads its score at the last token of prompt + response + suffix: where
   `AutoModelForSequenceClassification` reads it on `tokenizer(apply_chat_template(conversation))`.
5. Truncation (:func:`fit`): when prompt + longest response exceeds max_length, the prompt keeps
   its last max_prompt_length tokens (default half of max_length; a leading BOS stays), then each
   response is cut to the room left. Training and scoring share it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Union

Prompt = Union[str, list[dict]]

_ADDS_BOS: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


class TemplateError(ValueError):
    """The tokenizer cannot render this conversation (no chat template, or an inconsistent one)."""


@dataclass
class Encoded:
    """A (prompt, response) as token ids, cut where generation and scoring need it."""

    prompt_ids: list[int]
    response_ids: list[int]  # ends with the end-of-turn token (or EOS for raw text)
    suffix_ids: list[int]    # template tokens after the end of turn (ChatML: the newline)
    resplit: bool = False    # a token would have merged across a boundary (rule 3)

    @property
    def policy_ids(self) -> list[int]:
        """What a policy is trained on and generates: prompt + response."""
        return self.prompt_ids + self.response_ids

    @property
    def reward_ids(self) -> list[int]:
        """The standard rendering, which a reward model reads at its last token."""
        return self.prompt_ids + self.response_ids + self.suffix_ids


# ---------------------------------------------------------------------------
# BOS, rendering
# ---------------------------------------------------------------------------


def adds_bos(tokenizer) -> bool:
    """Whether `tokenizer(text)` puts a BOS in front on its own (Llama-2, Gemma: yes; GPT-2, Qwen: no)."""
    try:
        return _ADDS_BOS[tokenizer]
    except (KeyError, TypeError):
        pass
    bos = tokenizer.bos_token_id
    probe = tokenizer("a", add_special_tokens=True).input_ids
    value = bos is not None and bool(probe) and probe[0] == bos
    try:
        _ADDS_BOS[tokenizer] = value
    except TypeError:
        pass
    return value


def bos_prefix(tokenizer, text: str) -> list[int]:
    """[bos] when the tokenizer adds one by itself and the rendered text does not start with it; else []."""
    bos = tokenizer.bos_token
    if bos is None or text.startswith(bos) or not adds_bos(tokenizer):
        return []
    return [tokenizer.bos_token_id]


def _template(tokenizer):
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template, so chat messages cannot be "
            "rendered; give model.tokenizer one that has, or use prompt/completion strings or text rows"
        )
    return tokenizer


def render_prompt(tokenizer, prompt: Prompt) -> str:
    """The text generation continues from: a chat prompt with the generation prompt, or raw text as is."""
    if isinstance(prompt, str):
        return prompt
    return _template(tokenizer).apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def strip_end(text: str, start: int, end: int) -> int:
    """End of text[start:end] without its trailing whitespace (what follows the end-of-turn token)."""
    while end > start and text[end - 1].isspace():
        end -= 1
    return end


def _render_pair(tokenizer, prompt: Prompt, response: Any) -> tuple[str, int, int]:
    """(full text, end of the prompt, end of the response) for a prompt and its response."""
    if isinstance(prompt, str):
        eos = tokenizer.eos_token or ""
        text = prompt + response
        if eos and not text.endswith(eos):
            text += eos
        return text, len(prompt), len(text)
    messages = response if isinstance(response, list) else [{"role": "assistant", "content": response}]
    prompt_text = render_prompt(tokenizer, prompt)
    full = tokenizer.apply_chat_template(prompt + messages, tokenize=False)
    if not full.startswith(prompt_text):
        raise TemplateError("the chat template does not render the prompt as a prefix of the conversation")
    return full, len(prompt_text), strip_end(full, len(prompt_text), len(full))


# ---------------------------------------------------------------------------
# Tokenizing at boundaries
# ---------------------------------------------------------------------------


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def encode_segments(tokenizer, text: str, cuts: list[int]) -> tuple[list[int], list[int], bool]:
    """Token ids of `text` cut at character offsets `cuts` (rule 3; no BOS), the offset at which each
    token's segment starts, and whether a piece had to be tokenized alone."""
    bounds = [0] + sorted(c for c in set(cuts) if 0 < c < len(text)) + [len(text)]
    ids: list[int] = []
    starts: list[int] = []
    resplit = False
    for start, end in zip(bounds, bounds[1:]):
        whole = _ids(tokenizer, text[:end])
        if whole[: len(ids)] == ids:
            piece = whole[len(ids):]
        else:  # a token would merge across text[start]: the piece is tokenized alone
            piece, resplit = _ids(tokenizer, text[start:end]), True
        ids += piece
        starts += [start] * len(piece)
    return ids, starts, resplit


def prompt_ids(tokenizer, prompt: Prompt) -> list[int]:
    """The ids generation starts from (rules 1-2)."""
    text = render_prompt(tokenizer, prompt)
    return bos_prefix(tokenizer, text) + _ids(tokenizer, text)


def encode(tokenizer, prompt: Prompt, response: Any) -> Encoded:
    """A prompt and one response (a string, or an assistant message list) as ids (rules 1-4)."""
    text, prompt_end, response_end = _render_pair(tokenizer, prompt, response)
    ids, starts, resplit = encode_segments(tokenizer, text, [prompt_end, response_end])
    parts: tuple[list[int], list[int], list[int]] = ([], [], [])
    for token, start in zip(ids, starts):
        parts[0 if start < prompt_end else 1 if start < response_end else 2].append(token)
    return Encoded(bos_prefix(tokenizer, text) + parts[0], parts[1], parts[2], resplit)


def chat_spans(tokenizer, messages: list[dict], train_from: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns from `train_from` on.

    Turn i runs from the end of messages[:i] rendered with the generation prompt to the end of
    messages[:i+1] without trailing whitespace: the answer and its end-of-turn token (rule 4).
    """
    _template(tokenizer)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < train_from:
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(upto) or not upto.startswith(before):
            raise TemplateError(f"the chat template does not render conversations prefix-consistently (turn {i}); "
                                "assistant turns cannot be located")
        spans.append((len(before), strip_end(upto, len(before), len(upto))))
    return full, spans


def encode_spans(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool], bool]:
    """Ids of `text` cut at the spans' edges (BOS included), which tokens lie in a span, and the re-split flag."""
    ids, starts, resplit = encode_segments(tokenizer, text, [edge for span in spans for edge in span])
    inside = [any(s <= start < e for s, e in spans) for start in starts]
    bos = bos_prefix(tokenizer, text)
    return bos + ids, [False] * len(bos) + inside, resplit


# ---------------------------------------------------------------------------
# Truncation, scoring sequences, stop tokens
# ---------------------------------------------------------------------------


def fit(prompt: list[int], responses: list[list[int]], max_length: int, max_prompt_length: int | None,
        bos_id: int | None) -> tuple[list[int], list[list[int]], bool]:
    """Prompt and responses cut so that prompt + each response fits max_length (rule 5)."""
    longest = len(prompt) + max((len(r) for r in responses), default=0)
    if longest <= max_length:
        return prompt, responses, False
    keep = 1 if prompt and bos_id is not None and prompt[0] == bos_id else 0
    limit = max_prompt_length if max_prompt_length is not None else max_length // 2
    limit = max(keep + 1, min(limit, max_length - 1))  # leave room for at least one response token
    if len(prompt) > limit:
        prompt = prompt[:keep] + prompt[len(prompt) - (limit - keep):]
    room = max_length - len(prompt)
    return prompt, [r[:room] for r in responses], True


def unfinished_response_ids(tokenizer, enc: Encoded) -> list[int]:
    """A response that a token limit cut, as the policy produced it: the rendering's end-of-turn token removed,
    and no template suffix after it (a truncated answer is not made to look finished)."""
    if not enc.response_ids or enc.response_ids[-1] not in stop_token_ids(tokenizer):
        raise TemplateError("this tokenizer's rendering of a response does not end with a stop token, so a "
                            "truncated response cannot be told from a finished one")
    return enc.response_ids[:-1]


def reward_ids(tokenizer, prompt: Prompt, response: Any, max_length: int,
               max_prompt_length: int | None = None, ended: bool = True) -> tuple[list[int], bool]:
    """What a reward model reads for (prompt, response): the standard rendering, fitted; and whether it was cut.
    A response that did not end (a token limit cut it) is read as produced (unfinished_response_ids)."""
    enc = encode(tokenizer, prompt, response)
    response_ids = enc.response_ids + enc.suffix_ids if ended else unfinished_response_ids(tokenizer, enc)
    head, (tail,), cut = fit(enc.prompt_ids, [response_ids], max_length, max_prompt_length, tokenizer.bos_token_id)
    return head + tail, cut


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end a generated response: EOS and the chat template's end-of-turn token (Llama-3's
    <|eot_id|> is not its EOS), so generation stops where training's responses end."""
    stops = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if getattr(tokenizer, "chat_template", None):
        probe = encode(tokenizer, [{"role": "user", "content": "hi"}], "ok")
        special = set(tokenizer.all_special_ids) | {
            i for i, added in getattr(tokenizer, "added_tokens_decoder", {}).items() if added.special}
        if probe.response_ids and probe.response_ids[-1] in special:
            stops.add(probe.response_ids[-1])
    return sorted(stops)
