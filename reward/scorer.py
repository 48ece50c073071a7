"""The one reward-model scorer: `align score`, `align pairs`' judge, `align eval` and `ppo.rewards` all read a
(prompt, response) the way the reward model trained on it and score it with this class.

What the model reads (alignment.data.text): the standard rendering of prompt + response (the template's end of
turn and its suffix after it), fitted to the length the model trained at (`reward_max_length` and
`reward_max_prompt_length` in its config, written by `align rm`). A response that a token limit cut is read as
produced, without an end of turn it never wrote. Scores come from the last real token (reward.model), and with
`normalize` as (r - reward_mean) / reward_std, the statistics stored at export.

The model is loaded either plainly (`RewardScorer(path)`: transformers / peft, on one device) or inside a
training job (`RewardScorer.in_engine`: frozen, sharded under ZeRO-3 like the rest of the job).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from alignment.core.export import load_exported
from alignment.core.modeling import unwrap
from alignment.core.models import ModelError, load_model, load_tokenizer
from alignment.data import text
from alignment.data.sources import DataError
from reward.model import sequence_rewards

DEFAULT_MAX_LENGTH = 512


def scored_sequence(tokenizer, prompt, response, max_length: int,
                    max_prompt_length: int | None = None, ended: bool = True) -> tuple[list[int], bool]:
    """(ids, truncated) a reward model reads for prompt + response; a string prompt with message responses
    becomes a user turn, a chat prompt with a string response an assistant turn."""
    if isinstance(prompt, str) and not isinstance(response, str):
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and isinstance(response, str):
        response = [{"role": "assistant", "content": response}]
    try:
        return text.reward_ids(tokenizer, prompt, response, max_length, max_prompt_length, ended)
    except text.TemplateError as exc:
        raise DataError(str(exc)) from None


def sequence_ids(tokenizer, prompt, response, max_length: int, max_prompt_length: int | None = None,
                 ended: bool = True) -> list[int]:
    """The ids of scored_sequence alone."""
    return scored_sequence(tokenizer, prompt, response, max_length, max_prompt_length, ended)[0]


class RewardScorer:
    """Score responses with an exported reward model."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", normalize: bool = False, *,
                 trust_remote_code: bool = False, revision: str | None = None, _model=None):
        self.path = Path(path)
        self.tokenizer = load_tokenizer(str(path), trust_remote_code, revision)
        if _model is None:
            _model = load_exported(str(path), "reward", trust_remote_code=trust_remote_code,
                                   revision=revision).to(device).eval()
        self.model = _model
        self.device = torch.device(device)
        config = unwrap(self.model).config
        self.mean = getattr(config, "reward_mean", None)
        self.std = getattr(config, "reward_std", None)
        # Score sequences cut the way training cut them (alignment.data.text.fit), when the export says how.
        self.max_length = getattr(config, "reward_max_length", None) or DEFAULT_MAX_LENGTH
        self.max_prompt_length = getattr(config, "reward_max_prompt_length", None)
        if normalize and (self.mean is None or self.std is None):
            raise ModelError(f"{self.path} stores no reward_mean / reward_std (config.reward_mean / reward_std), so "
                             "normalised rewards cannot apply; export it with `align rm`, or do not normalise")
        self.normalize = normalize
        # The template's text after an ended turn (ChatML's newline): the RM trained with it (text rule 4).
        self.suffix = text.encode(self.tokenizer, [{"role": "user", "content": "x"}], "y").suffix_ids
        self._same_ids: dict[int, bool] = {}  # per policy tokenizer: the same vocabulary and template

    @classmethod
    def in_engine(cls, engine, path: str, normalize: bool = False, trust_remote_code: bool = False) -> "RewardScorer":
        """The reward model frozen inside a training job (sharded under ZeRO-3 like the rest, no optimizer)."""
        with engine.model_init(trainable=False):
            model = load_model(path, "reward", trust_remote_code=trust_remote_code)
        return cls(path, engine.dist.device, normalize, trust_remote_code=trust_remote_code,
                   _model=engine.prepare_frozen(model))

    # -- what the model reads ----------------------------------------------------
    def read(self, prompt, response, ended: bool = True, max_length: int | None = None) -> tuple[list[int], bool]:
        """(ids, truncated) for a prompt and a response text or message list (scored_sequence at this model's
        lengths)."""
        return scored_sequence(self.tokenizer, prompt, response, max_length or self.max_length,
                               self.max_prompt_length, ended)

    def read_policy_ids(self, prompt, prompt_ids: list[int], response_ids: list[int], ended: bool,
                        policy_tokenizer) -> list[int]:
        """What the model reads for a response a policy generated as ids: those very ids when both share the
        vocabulary and the template (plus the suffix when the turn ended), else the response decoded and read as
        text; a cut answer's text is tokenized alone, which works for any reward-model template."""
        if id(policy_tokenizer) not in self._same_ids:
            self._same_ids[id(policy_tokenizer)] = (self.tokenizer.get_vocab() == policy_tokenizer.get_vocab()
                                                    and self.tokenizer.chat_template == policy_tokenizer.chat_template)
        if self._same_ids[id(policy_tokenizer)]:
            suffix = self.suffix if ended and not isinstance(prompt, str) else []
            p_ids, r_ids = prompt_ids, response_ids + suffix
        else:
            response = policy_tokenizer.decode(response_ids, skip_special_tokens=True)
            if ended:
                enc = text.encode(self.tokenizer, prompt, response)
                p_ids, r_ids = enc.prompt_ids, enc.response_ids + enc.suffix_ids
            else:
                p_ids = text.prompt_ids(self.tokenizer, prompt)
                r_ids = self.tokenizer(response, add_special_tokens=False).input_ids
        head, (tail,), _ = text.fit(p_ids, [r_ids], self.max_length, self.max_prompt_length,
                                    self.tokenizer.bos_token_id)
        return head + tail

    # -- scoring -----------------------------------------------------------------
    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]]) -> torch.Tensor:
        """Rewards [N] (fp32, on CPU) of token sequences, one forward, right-padded."""
        width = max(len(s) for s in sequences)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(sequences), width), pad, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, seq in enumerate(sequences):
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        rewards = sequence_rewards(self.model, ids.to(self.device), mask.to(self.device)).cpu()
        if self.normalize:
            rewards = (rewards - self.mean) / max(self.std, 1e-6)
        return rewards

    def score_batched(self, sequences: list[list[int]], batch_size: int, progress: bool = False) -> list[float]:
        """Rewards for any number of token sequences, `batch_size` at a time, in input order."""
        from tqdm.auto import tqdm

        values: list[float] = []
        for start in tqdm(range(0, len(sequences), batch_size), desc="score", file=sys.stderr, disable=not progress):
            values += self.score_ids(sequences[start : start + batch_size]).tolist()
        return values
