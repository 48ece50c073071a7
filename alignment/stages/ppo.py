"""Online RL: PPO with a critic and GAE, and the critic-free family (GRPO, RLOO, REINFORCE++).

    align ppo configs/tiny/ppo.yaml      # ppo.advantage: gae | grpo | rloo | reinforce_pp
    align ppo configs/smollm2/grpo.yaml --set model.name_or_path=runs/quickstart/sft/final/merged

One iteration (train.max_steps of them) is one rollout and its updates:
  1. rollout: sample ppo.samples_per_prompt responses to each of ppo.prompts_per_rollout prompts
     (each rank its share; weights gathered once, decoding hook-free under ZeRO-3);
  2. score them: the built-in verifier, reward models and/or Python functions, weighted;
  3. log-probs of the actor (as it sampled) and the reference, and the critic's values, over
     response tokens; every rank then holds the whole rollout, so the math below and the
     minibatches are the same for any number of ranks;
  4. KL-shaped rewards (the KL penalty in the reward, or later in the loss);
  5. advantages and returns: GAE with the critic, or group-normalised (GRPO), leave-one-out
     (RLOO) or globally whitened returns (REINFORCE++);
  6. ppo.epochs passes of minibatches (train.global_batch_size episodes, train.micro_batch_size
     per forward) updating the actor (and the critic) through the engine;
  7. log: objective/*, policy/*, loss/*, val/*, response/*, time/*.
The math of steps 2-6 is alignment.rlhf (pure tensor functions, tested by hand). Where this
departs from the papers: a response's score sits on its last token (the EOS, or the last
generated token when it has none); the first iteration checks that the rollout's log-probs equal
the training pass's and that the ratio is 1 before any update.
"""

from __future__ import annotations

import importlib
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from alignment.core import loop, text
from alignment.core.config import GoldEvalConfig, RecipeBase, RecipeError, register_stage
from alignment.core.data import DataError, DataReport, check_messages
from alignment.core.export import export_model
from alignment.core.fingerprint import sequence_fingerprint
from alignment.core.modeling import response_logprobs, user_model
from alignment.core.models import count_parameters, load_model, load_tokenizer, resolve_model_path
from alignment.core.tracking import print_main
from alignment.evaluate import task
from alignment.evaluate.gold import gold_eval, gold_score_of_model
from alignment.rlhf import advantages as adv
from alignment.rlhf.kl import KLController, kl_estimate
from alignment.rlhf.ppo_losses import aggregate, normaliser_unit, policy_loss, value_loss
from alignment.rlhf.rewards import kl_shaped_rewards
from alignment.rlhf.rollout import KVCacheSampler, Rollout, episode_batch, group_batch, is_tempered, is_untruncated
from reward.model import DEFAULT_MAX_LENGTH, ensure_distinct_pad, sequence_rewards, token_values



@dataclass
class RewardSource:
    source: str = "???"
    """`gold` (the built-in task's verifier; prompts need a `gold` spec), a reward model directory (what
    `align rm` exports), or `module:function` called as function(prompts, responses, rows) -> list of floats."""
    weight: float = 1.0
    normalize: bool = False
    """Reward models: (r - reward_mean) / reward_std with the statistics stored at export (an error if absent)."""


@dataclass
class PPOConfig:
    advantage: Literal["gae", "grpo", "rloo", "reinforce_pp"] = "gae"
    """gae: PPO with a critic; grpo: group-normalised outcome; rloo: leave-one-out; reinforce_pp: REINFORCE++."""
    rewards: list[RewardSource] = field(default_factory=lambda: [RewardSource("gold")])
    prompts_per_rollout: int = 8
    """Prompts per iteration across all ranks (a multiple of the world size: each rank samples whole groups)."""
    samples_per_prompt: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    """Pure sampling (1, 0, 1) is the default. A temperature T != 1 trains the tempered policy softmax(logits / T)
    that it samples (log-probs of actor and reference from logits / T, as TRL's GRPOTrainer and verl); top-k /
    top-p warn: the KL estimate no longer holds."""
    epochs: int = 1
    """Passes over each rollout; a pass is episodes / train.global_batch_size optimizer steps."""
    oversample: int = 1
    """Dynamic sampling (DAPO, Yu et al. 2025, sec. 3.2): sample this many times more prompts and keep, per
    rank, prompts_per_rollout / world size groups whose samples scored differently first (a group whose
    samples all tie carries no group-baseline signal), filling up with tied ones. 1 = off."""
    kl_coef: float = 0.05
    kl_estimator: Optional[Literal["k1", "k2", "k3"]] = None
    """None: k3 when the KL is in the loss, k1 when it is in the reward."""
    kl_in: Optional[Literal["reward", "loss"]] = None
    """Where the KL penalty goes; None: the loss for grpo, the reward otherwise."""
    kl_target: Optional[float] = None
    """Adapt kl_coef towards this mean per-response KL (Ziegler et al. 2019); None keeps it fixed."""
    kl_horizon: int = 10000
    clip_low: float = 0.2
    clip_high: float = 0.2
    """Separate upper clip (DAPO's clip-higher, e.g. 0.28)."""
    dual_clip: Optional[float] = None
    """Bound on the loss of negative-advantage tokens, c > 1 (e.g. 3)."""
    value_clip: Optional[float] = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    loss_aggregation: Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "seq_mean_token_sum_norm"] \
        = "token_mean"
    whiten_advantages: bool = True
    """gae, reinforce_pp: whiten advantages over the whole rollout."""
    grpo_scale: bool = True
    """grpo: divide by the group's std (false: Dr. GRPO)."""
    score_clip: Optional[float] = None
    """Clip the total score to [-c, c]."""
    missing_eos_penalty: Optional[float] = None
    """Subtract this from the score of a response that did not stop by itself."""
    entropy_coef: float = 0.0
    critic: Optional[str] = None
    """gae's critic initialisation: None = the first reward model among ppo.rewards, else the policy with a new head."""
    critic_learning_rate: Optional[float] = None
    """None: train.learning_rate."""
    disable_dropout: bool = True
    share_prompt: bool = True
    """Run each group's prompt once in the training pass, [prompt | response 1 | ... | response K] with each
    response seeing only the prompt and itself (alignment.rlhf.rollout.group_batch; the same log-probs as
    separate rows). Needs train.global_batch_size and micro_batch_size to be multiples of samples_per_prompt."""
    guidance: Optional[Literal["reference"]] = None
    """reference: in a group whose samples all fall short of the verifier's full credit, the last sample is
    replaced by the prompt's reference answer (its `gold` spec), scored by ppo.rewards like any response:
    off-policy guidance (LUFFY, Yan et al. 2025, arXiv:2504.14945, without its policy shaping; the guided
    response's old log-probs are the current policy's, so its ratio starts at 1). The group then holds the
    right answer to move towards. rollout/guided_share counts them; objective/scores leaves them out."""
    rollout_batch_size: int = 64
    """Sequences per decoding batch on a rank."""
    forward_batch_size: Optional[int] = None
    """Episodes per no-grad forward of the reference and the critic in step 3 on a rank; None = 4 x
    train.micro_batch_size. These forwards keep no activations for a backward, so they can take more rows
    than a training micro-batch, and larger matmuls run faster on CPU (SmolLM2-135M, bf16, 64 GRPO
    episodes: 1.15 s per model in chunks of 8, 0.91 s in chunks of 32). The actor's old log-probs stay in
    micro-batches, the shape of the training pass the ratio compares them with: in bf16 the first update's
    mean |ratio - 1| was 0.011 in micro-batches of 8 and 0.043 in chunks of 32 (bench/ppo.py --parts grpo)."""
    max_prompt_length: Optional[int] = None
    """Prompts longer than this (tokens) are dropped and counted; None = data.max_length."""
    gold_eval: GoldEvalConfig = field(default_factory=GoldEvalConfig)


@dataclass
class PPORecipe(RecipeBase):
    ppo: PPOConfig = field(default_factory=PPOConfig)


def validate_ppo(recipe: PPORecipe) -> None:
    cfg, t = recipe.ppo, recipe.train
    problems = []
    if not cfg.rewards:
        problems.append("ppo.rewards needs at least one source")
    if min(cfg.samples_per_prompt, cfg.prompts_per_rollout, cfg.max_new_tokens, cfg.epochs, cfg.oversample) < 1:
        problems.append("ppo.samples_per_prompt, prompts_per_rollout, max_new_tokens, epochs and oversample must be >= 1")
    if cfg.advantage in ("grpo", "rloo") and cfg.samples_per_prompt < 2:
        problems.append(f"ppo.advantage {cfg.advantage} compares samples of a prompt: samples_per_prompt >= 2")
    episodes = cfg.prompts_per_rollout * cfg.samples_per_prompt
    if episodes % t.global_batch_size:
        problems.append(f"train.global_batch_size ({t.global_batch_size}) must divide the episodes of a rollout "
                        f"(ppo.prompts_per_rollout x samples_per_prompt = {episodes})")
    if cfg.share_prompt and cfg.samples_per_prompt > 1 and (t.global_batch_size % cfg.samples_per_prompt
                                                              or t.micro_batch_size % cfg.samples_per_prompt):
        problems.append(f"ppo.share_prompt packs whole groups: train.global_batch_size ({t.global_batch_size}) and "
                        f"micro_batch_size ({t.micro_batch_size}) must be multiples of ppo.samples_per_prompt "
                        f"({cfg.samples_per_prompt}), or set ppo.share_prompt: false")
    if cfg.forward_batch_size is not None and (cfg.forward_batch_size < 1 or (
            cfg.share_prompt and cfg.samples_per_prompt > 1 and cfg.forward_batch_size % cfg.samples_per_prompt)):
        problems.append(f"ppo.forward_batch_size ({cfg.forward_batch_size}) must be positive and, with "
                        f"ppo.share_prompt, a multiple of ppo.samples_per_prompt ({cfg.samples_per_prompt})")
    if not 0 <= cfg.clip_low < 1 or cfg.clip_high < 0:
        problems.append("ppo.clip_low must be in [0, 1) and ppo.clip_high >= 0")
    if cfg.dual_clip is not None and cfg.dual_clip <= 1:
        problems.append("ppo.dual_clip must be > 1")
    if cfg.temperature < 0 or not 0 < cfg.top_p <= 1 or cfg.top_k < 0:
        problems.append("ppo.temperature >= 0, 0 < ppo.top_p <= 1, ppo.top_k >= 0")
    if cfg.temperature == 0 and cfg.advantage in ("grpo", "rloo"):
        problems.append("ppo.temperature 0 (greedy) gives identical samples: group baselines need sampling")
    if cfg.guidance and cfg.advantage not in ("grpo", "rloo"):
        problems.append(f"ppo.guidance replaces a sample within a group: use it with advantage grpo or rloo, "
                        f"not {cfg.advantage}")
    if cfg.kl_coef < 0 or (cfg.kl_target is not None and cfg.kl_target <= 0):
        problems.append("ppo.kl_coef must be >= 0 and ppo.kl_target > 0")
    for i, source in enumerate(cfg.rewards):
        if source.source != "gold" and ":" not in source.source and not Path(source.source).expanduser().exists():
            problems.append(f"ppo.rewards[{i}].source: {source.source!r} is neither gold, module:function nor a "
                            "reward model directory that exists")
    if problems:
        raise RecipeError("; ".join(problems))


register_stage("ppo", PPORecipe, validate_ppo)


def resolved(cfg: PPOConfig) -> tuple[str, str]:
    """(kl_in, kl_estimator) after the per-estimator defaults."""
    kl_in = cfg.kl_in or ("loss" if cfg.advantage == "grpo" else "reward")
    return kl_in, cfg.kl_estimator or ("k3" if kl_in == "loss" else "k1")


# ---------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------


@dataclass
class PromptSet:
    prompts: list          # chat messages or raw text, as the rows give them
    ids: list[list[int]]   # text.prompt_ids of each
    rows: list[dict]       # the rows (gold specs and any other fields reward functions read)


def load_prompts(rows, tokenizer, max_prompt_length: int, report: DataReport, on_bad_row: str) -> PromptSet:
    out = PromptSet([], [], [])
    report.rows_read += len(rows)
    for row in rows:
        try:
            row.check()
            prompt = row.data.get("prompt")
            if isinstance(prompt, list):
                prompt = check_messages(prompt, row.origin, "prompt")
            elif not isinstance(prompt, str):
                raise DataError(f"{row.origin}: field 'prompt' must be a string or a list of messages")
            ids = text.prompt_ids(tokenizer, prompt)
        except (DataError, text.TemplateError) as exc:
            if on_bad_row == "error":
                raise DataError(str(exc)) from None
            report.skip(str(exc).split(": ", 1)[-1][:60], str(exc))
            continue
        if len(ids) > max_prompt_length:
            report.dropped["prompt longer than ppo.max_prompt_length"] += 1
            continue
        out.prompts.append(prompt)
        out.ids.append(ids)
        out.rows.append(row.data)
        report.tokens += len(ids)
    report.examples = len(out.ids)
    return out


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


# ---------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------


class RewardModelSource:
    """A frozen reward model (sharded under ZeRO-3 like the rest) scoring prompt + response as it trained."""

    def __init__(self, engine, path: str, policy_tokenizer, normalize: bool, recipe):
        self.engine, self.path = engine, path
        self.tokenizer = load_tokenizer(path, recipe.model.trust_remote_code)
        with engine.model_init(trainable=False):
            model = load_model(path, "reward", trust_remote_code=recipe.model.trust_remote_code)
        config = model.config
        self.max_length = getattr(config, "reward_max_length", None) or DEFAULT_MAX_LENGTH
        self.max_prompt_length = getattr(config, "reward_max_prompt_length", None)
        self.mean, self.std = getattr(config, "reward_mean", None), getattr(config, "reward_std", None)
        if normalize and (self.mean is None or self.std is None):
            raise RecipeError(f"ppo.rewards: {path} stores no reward_mean / reward_std, so normalize: true cannot "
                              "apply; export it with `align rm` or set normalize: false")
        self.normalize = normalize
        self.model = engine.prepare_frozen(model)
        # The same vocabulary and template: the ids the policy produced are the ids the RM reads.
        self.same_ids = (self.tokenizer.get_vocab() == policy_tokenizer.get_vocab()
                         and self.tokenizer.chat_template == policy_tokenizer.chat_template)
        self.policy_tokenizer = policy_tokenizer
        # The template's text after an ended turn (ChatML's newline): the RM trained with it (core.text rule 4).
        self.suffix = text.encode(self.tokenizer, [{"role": "user", "content": "x"}], "y").suffix_ids

    def sequence(self, prompt, prompt_ids: list[int], response_ids: list[int], ended: bool) -> list[int]:
        """What the RM reads (alignment.core.text): the standard rendering when the turn ended, the tokens as
        generated when it was cut (a truncated answer is not made to look finished)."""
        if self.same_ids:
            suffix = self.suffix if ended and not isinstance(prompt, str) else []
            p_ids, r_ids = prompt_ids, response_ids + suffix
        else:
            response = self.policy_tokenizer.decode(response_ids, skip_special_tokens=True)
            if ended:
                enc = text.encode(self.tokenizer, prompt, response)
                p_ids, r_ids = enc.prompt_ids, enc.response_ids + enc.suffix_ids
            else:
                p_ids = text.prompt_ids(self.tokenizer, prompt)
                r_ids = self.tokenizer(response, add_special_tokens=False).input_ids
        head, (tail,), _ = text.fit(p_ids, [r_ids], self.max_length, self.max_prompt_length, self.tokenizer.bos_token_id)
        return head + tail

    @torch.no_grad()
    def __call__(self, prompts, rollout: Rollout, rows, batch_size: int) -> list[float]:
        sequences = [self.sequence(p, pi, r, e) for p, pi, r, e in
                     zip(prompts, rollout.prompt_ids, rollout.response_ids, rollout.ended)]
        out: list[float] = []
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, seq in enumerate(chunk):
                ids[i, : len(seq)], mask[i, : len(seq)] = torch.tensor(seq), 1
            device = self.engine.dist.device
            out += sequence_rewards(self.model, ids.to(device), mask.to(device)).cpu().tolist()
        if self.normalize:
            out = [(r - self.mean) / max(self.std, 1e-6) for r in out]
        return out


def function_source(spec: str):
    module, _, name = spec.partition(":")
    fn = getattr(importlib.import_module(module), name)
    return lambda prompts, responses, rows: [float(x) for x in fn(prompts, responses, rows)]


# ---------------------------------------------------------------------------
# The training pass over episodes
# ---------------------------------------------------------------------------


def informative_groups(scores: torch.Tensor, group_size: int, keep: int) -> list[int]:
    """Episode indices of `keep` groups (adjacent runs of group_size): those whose scores differ first, in
    order, then tied ones."""
    spread = scores.view(-1, group_size).std(dim=1) > 0 if group_size > 1 else torch.ones(len(scores), dtype=torch.bool)
    order = [g for g in range(len(spread)) if spread[g]] + [g for g in range(len(spread)) if not spread[g]]
    return [g * group_size + k for g in sorted(order[:keep]) for k in range(group_size)]


def all_wrong_groups(texts: list[str], rows: list[dict], group_size: int) -> list[int]:
    """Groups (of `group_size` consecutive episodes) none of whose responses the verifier gives full credit;
    every row needs its `gold` spec."""
    out = []
    for g in range(len(texts) // group_size):
        members = range(g * group_size, (g + 1) * group_size)
        if any(not rows[i].get("gold") for i in members):
            raise DataError("ppo.guidance: reference needs a 'gold' spec on every prompt row (builtin:prompts_*)")
        if max(task.score(rows[i]["gold"], texts[i]) for i in members) < task.FULL_CREDIT:
            out.append(g)
    return out


def reference_response(tokenizer, prompt, row: dict, max_new_tokens: int, stops: list[int]) -> list[int]:
    """The verifier's reference answer as the response ids the training pass sees (the one tokenization
    path), ending with the end-of-turn token, cut to max_new_tokens as a sample would be."""
    ids = text.encode(tokenizer, prompt, task.reference_answer(row["gold"])).response_ids
    return ids[:max_new_tokens]


def episode_seed(seed: int, iteration: int, prompt: int, sample: int) -> int:
    """The sampling seed of one episode: the same whichever rank or batch samples it."""
    return (((seed * 1_000_003 + iteration) * 1_000_003 + prompt) * 1_009 + sample) % (2**62)


def micro_slices(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def layout(prompt_ids, response_ids, group: int, pad_id: int, device, temperature: float = 1.0) -> dict:
    """Episodes as the training pass reads them: groups packed with their prompt once (group > 1), or a row each.
    A sampling temperature other than 1 (and 0, greedy) makes the log-probs read from them those of
    softmax(logits / temperature): the distribution the rollout drew from."""
    batch = group_batch(prompt_ids, response_ids, group, pad_id, device) if group > 1 \
        else episode_batch(prompt_ids, response_ids, pad_id, device)
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
        batch = layout(rollout.prompt_ids[s], rollout.response_ids[s], group, pad_id, device, temperature)
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


# ---------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------


def run(recipe: PPORecipe, resume: bool = False) -> dict:
    validate_ppo(recipe)
    cfg, t = recipe.ppo, recipe.train
    kl_in, kl_name = resolved(cfg)
    K = cfg.samples_per_prompt
    # Setup. Engine, output directory, resolved recipe, metrics logger.
    run, checkpoint = loop.setup_run(recipe, "ppo", resume)
    engine = run.engine
    dist, device = engine.dist, engine.dist.device
    if cfg.prompts_per_rollout % dist.world_size:
        raise RecipeError(f"ppo.prompts_per_rollout ({cfg.prompts_per_rollout}) must be a multiple of the world "
                          f"size ({dist.world_size}): each rank samples whole groups")
    if not is_untruncated(cfg.top_k, cfg.top_p):
        print_main(dist.is_main, f"warning: sampling with top_k {cfg.top_k}, top_p {cfg.top_p} truncates the "
                   "policy's distribution: the KL estimate and the importance ratio no longer hold exactly")
    elif is_tempered(cfg.temperature):
        print_main(dist.is_main, f"sampling at temperature {cfg.temperature}: the policy trained, its ratio, entropy "
                   f"and KL to the reference are those of softmax(logits / {cfg.temperature}), the distribution "
                   "sampled; greedy decoding (the gold score) is the same either way")

    # Setup. Tokenizer and prompts (the data report counts everything dropped).
    model_path = resolve_model_path(recipe.model.name_or_path)
    tokenizer = load_tokenizer(recipe.model.tokenizer or model_path, recipe.model.trust_remote_code, recipe.model.revision)
    rows, _ = loop.read_splits(recipe)
    report = DataReport("prompts")
    prompts = load_prompts(rows, tokenizer, cfg.max_prompt_length or recipe.data.max_length, report,
                           recipe.data.on_bad_row)
    print_main(dist.is_main, report.format())
    if len(prompts.ids) < cfg.prompts_per_rollout:
        raise DataError(f"{recipe.data.train}: {len(prompts.ids)} usable prompts, fewer than ppo.prompts_per_rollout")
    episodes = cfg.prompts_per_rollout * K
    updates_per_iteration = cfg.epochs * episodes // engine.layout.global_batch_size
    iterations = loop.total_steps(recipe, len(prompts.ids) // cfg.prompts_per_rollout)
    order = loop.data_order(sequence_fingerprint(prompts.ids), len(prompts.ids), engine, recipe.seed)
    order["prompts_per_rollout"] = cfg.prompts_per_rollout
    loop.check_resume(checkpoint, order)

    # Setup. Roles: actor (trainable), critic (gae), reference (frozen; LoRA: the adapter off), rewards.
    actor = loop.load_trainable_model(engine, recipe, model_path, "causal_lm", disable_dropout=cfg.disable_dropout)
    trainable, total = count_parameters(actor)
    print_main(dist.is_main, f"actor {recipe.model.name_or_path}: {total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M "
               f"trainable; {cfg.advantage}, KL {kl_name} in the {kl_in} (coef {cfg.kl_coef}); {iterations} iterations "
               f"of {cfg.prompts_per_rollout} prompts x {K} samples, {updates_per_iteration} updates each")
    actor = engine.prepare(actor, iterations * updates_per_iteration)
    reference = None
    if not recipe.lora.enabled:
        with engine.model_init(trainable=False):
            reference = engine.prepare_frozen(load_model(model_path, "causal_lm", revision=recipe.model.revision,
                                                         trust_remote_code=recipe.model.trust_remote_code,
                                                         attn_implementation=loop.attention_implementation(engine, recipe)))
    sources = []
    for source in cfg.rewards:
        if source.source == "gold":
            fn = function_source("alignment.evaluate.rewards:gold")
        elif Path(source.source).expanduser().exists():
            fn = RewardModelSource(engine, source.source, tokenizer, source.normalize, recipe)
        else:
            fn = function_source(source.source)
        sources.append((source, fn))
    critic = None
    if cfg.advantage == "gae":
        first_rm = next((s.source for s, fn in sources if isinstance(fn, RewardModelSource)), None)
        critic_path = cfg.critic or first_rm or model_path

        def before_adapters(model):
            ensure_distinct_pad(load_tokenizer(critic_path, recipe.model.trust_remote_code), model)

        critic = loop.load_trainable_model(engine, recipe, critic_path, "reward", before_adapters,
                                           disable_dropout=cfg.disable_dropout)
        print_main(dist.is_main, f"critic from {critic_path}")
        critic = engine.prepare(critic, iterations * updates_per_iteration, learning_rate=cfg.critic_learning_rate)
    models = {"policy": actor, **({"critic": critic} if critic is not None else {})}
    kl_ctl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    reach = kl_ctl.reach(episodes, iterations)
    if cfg.kl_target is not None and reach < 2.0:
        print_main(dist.is_main, f"warning: ppo.kl_target {cfg.kl_target}: over {iterations} iterations of {episodes} "
                   f"episodes the controller can move ppo.kl_coef by at most x{reach:.3g} "
                   f"(ppo.kl_horizon {cfg.kl_horizon} episodes); lower ppo.kl_horizon (e.g. "
                   f"{max(1, episodes * iterations // 10)}) for the target to bind")
    start = loop.resume(run, checkpoint, models)
    if checkpoint is not None:
        from alignment.core.checkpoint import read_state

        kl_ctl.value = float(read_state(checkpoint).get("kl_coef", kl_ctl.value))

    gold = {}
    if cfg.gold_eval.prompts and start == 0:
        gold["before"] = gold_eval(engine, model_path, cfg.gold_eval, recipe.model, base=True,
                                   samples_to=Path(recipe.output_dir) / "gold_samples_before.jsonl")
        run.logger.log({"gold/score_before": gold["before"]["gold/score"]}, step=0)
        if cfg.gold_eval.interval:  # the same weights as the export's score above, in training form (its baseline)
            run.logger.log({"gold/score": gold_during_training(engine, actor, tokenizer, cfg.gold_eval, 0)}, step=0)

    stops = text.stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id
    micro = engine.layout.micro_batch_size
    group = K if cfg.share_prompt else 1
    progress = loop.make_progress(run, iterations, start, cfg.advantage)
    health = Health(cfg, K)
    metrics: dict = {}
    for iteration in range(start + 1, iterations + 1):
        loop.debug_fault(iteration, dist.rank)
        clock = Clock()

        # Step 1. Rollout: this rank's prompts, K samples each, one seed per episode.
        indices = rollout_prompts(len(prompts.ids), cfg.prompts_per_rollout * cfg.oversample, iteration, recipe.seed)
        per_rank = cfg.prompts_per_rollout * cfg.oversample // dist.world_size
        mine = indices[dist.rank * per_rank : (dist.rank + 1) * per_rank]
        episode_prompts = [i for i in mine for _ in range(K)]
        seeds = [episode_seed(recipe.seed, iteration, i, k) for i in mine for k in range(K)]
        with engine.generation_view(actor) as policy:
            sampler = KVCacheSampler(policy, max_new_tokens=cfg.max_new_tokens, stop_ids=stops, pad_id=pad_id,
                                     batch_size=cfg.rollout_batch_size, temperature=cfg.temperature,
                                     top_k=cfg.top_k, top_p=cfg.top_p, device=device)
            rollout = sampler([prompts.ids[i] for i in episode_prompts], seeds)
        clock.lap("rollout")
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in rollout.response_ids]
        ep_prompts = [prompts.prompts[i] for i in episode_prompts]
        ep_rows = [prompts.rows[i] for i in episode_prompts]
        guided = torch.zeros(len(rollout), dtype=torch.bool)
        if cfg.guidance == "reference":  # Step 1b. The reference answer into groups with no right answer.
            for g in all_wrong_groups(texts, ep_rows, K):
                last = g * K + K - 1
                rollout.response_ids[last] = reference_response(tokenizer, ep_prompts[last], ep_rows[last],
                                                                cfg.max_new_tokens, stops)
                rollout.ended[last] = rollout.response_ids[last][-1] in stops
                if rollout.logprobs:  # not sampled: nothing to compare with the training pass
                    rollout.logprobs[last] = [float("nan")] * len(rollout.response_ids[last])
                texts[last] = tokenizer.decode(rollout.response_ids[last], skip_special_tokens=True)
                guided[last] = True

        # Step 2. Score every response with every source, weighted.
        scores = torch.zeros(len(rollout))
        per_source = {}
        for source, fn in sources:
            values = (fn(ep_prompts, rollout, ep_rows, cfg.rollout_batch_size) if isinstance(fn, RewardModelSource)
                      else fn(ep_prompts, texts, ep_rows))
            values = torch.tensor(values, dtype=torch.float32)
            per_source[source.source] = values
            scores += source.weight * values
        ended = torch.tensor(rollout.ended, dtype=torch.bool)
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * (~ended).float()
        if cfg.score_clip is not None:
            scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
        informative_share = float((scores.view(-1, K).std(dim=1) > 0).float().mean()) if K > 1 else float("nan")
        # Every sampled response's score, before dynamic sampling keeps the informative groups: the policy's own
        # score (objective/scores, over the kept groups, runs higher whenever oversample > 1).
        all_sampled = {"sum": float(scores[~guided].sum()), "n": float((~guided).sum())}
        if cfg.oversample > 1:  # dynamic sampling: keep the groups that carry signal
            keep = informative_groups(scores, K, cfg.prompts_per_rollout // dist.world_size)
            rollout = Rollout(*[[getattr(rollout, f)[i] for i in keep] for f in
                                ("prompt_ids", "response_ids", "ended", "logprobs")])
            episode_prompts = [episode_prompts[i] for i in keep]
            texts, scores, ended, guided = [texts[i] for i in keep], scores[keep], ended[keep], guided[keep]
            per_source = {k: v[keep] for k, v in per_source.items()}
        clock.lap("scoring")

        # Step 3. Log-probs of the actor as it sampled and of the reference; the critic's values.
        tau = cfg.temperature  # actor and reference both as the rollout sampled: softmax(logits / tau)
        chunk = cfg.forward_batch_size or 4 * micro
        old_logp = forward_in_chunks(response_logprobs, actor, rollout, pad_id, device, micro, group, tau)
        if reference is not None:
            ref_logp = forward_in_chunks(response_logprobs, reference, rollout, pad_id, device, chunk, group, tau)
        else:
            with user_model(actor).disable_adapter():
                ref_logp = forward_in_chunks(response_logprobs, actor, rollout, pad_id, device, chunk, group, tau)
        values = forward_in_chunks(token_values, critic, rollout, pad_id, device, chunk, group) if critic is not None \
            else torch.zeros_like(old_logp)
        T = old_logp.shape[1]
        sampled_logp = torch.zeros(len(rollout), T)
        for i, row in enumerate(rollout.logprobs):
            sampled_logp[i, : len(row)] = torch.tensor(row)
        local = {"prompt_ids": rollout.prompt_ids, "response_ids": rollout.response_ids, "scores": scores,
                 "ended": ended, "guided": guided, "old_logp": old_logp, "ref_logp": ref_logp, "values": values,
                 "sampled_logp": sampled_logp, "groups": [texts[i : i + K] for i in range(0, len(texts), K)],
                 **{f"score:{k}": v for k, v in per_source.items()}}
        buffer = gather_rollout(engine, local)  # every rank: the whole rollout, in rank order
        mask = episode_batch(buffer["prompt_ids"], buffer["response_ids"], pad_id)["response_mask"]
        clock.lap("logprobs")

        # Step 4. KL-shaped rewards.
        T = mask.shape[1]
        old_lp, ref_lp, vals = (buffer[k][:, :T] for k in ("old_logp", "ref_logp", "values"))
        beta = kl_ctl.value
        in_reward = kl_in == "reward"
        rewards, seq_kl = kl_shaped_rewards(buffer["scores"], old_lp, ref_lp, mask, kl_name, beta, in_reward)

        # Step 5. Advantages and returns.
        returns = None
        if cfg.advantage == "gae":
            advantages, returns = adv.gae(rewards, vals, mask, cfg.gamma, cfg.lam)
        elif cfg.advantage == "reinforce_pp":
            advantages = adv.discounted_returns(rewards, mask, cfg.gamma)
        else:
            outcome = buffer["scores"] - (beta * seq_kl if in_reward else 0.0)
            per_episode = (adv.group_advantages(outcome, K, cfg.grpo_scale) if cfg.advantage == "grpo"
                           else adv.leave_one_out_advantages(outcome, K))
            advantages = per_episode[:, None] * mask
        if cfg.whiten_advantages and cfg.advantage in ("gae", "reinforce_pp"):
            advantages = adv.masked_whiten(advantages, mask)

        # Step 6. Epochs of minibatch updates of the actor (and the critic) through the engine.
        update = {"old_logp": old_lp, "ref_logp": ref_lp, "advantages": advantages, "values": vals,
                  "returns": returns if returns is not None else torch.zeros_like(advantages)}
        stats = train_on_rollout(engine, cfg, actor, critic, buffer, update, mask, pad_id, iteration, beta,
                                 kl_name, kl_in, recipe.seed)
        clock.lap("update")

        # Step 7. Log (and adapt the KL coefficient).
        kl_ctl.update(float(seq_kl.mean()), episodes)
        checks = {"train/lr": stats.pop("lr"), "check/first_ratio_dev": stats.pop("first_ratio_dev"),
                  "check/first_approxkl": stats.pop("first_approxkl")}
        metrics = {**iteration_metrics(buffer, mask, seq_kl, beta, stats, vals, returns, clock, episodes), **checks}
        rollout_sums = dist.reduce_sums({"informative": informative_share, **all_sampled})  # one collective
        metrics["rollout/informative_share"] = rollout_sums["informative"] / dist.world_size
        metrics["rollout/scores_all_sampled"] = rollout_sums["sum"] / max(rollout_sums["n"], 1.0)
        if iteration == start + 1:
            # Truncated sampling draws from a distribution no training pass computes: nothing to compare.
            if is_untruncated(cfg.top_k, cfg.top_p):
                sampled = ~buffer["guided"]  # guided responses were not sampled: nothing to compare
                diff = float(((buffer["sampled_logp"][sampled, :T] - old_lp[sampled]).abs() * mask[sampled]).max())
                metrics["check/rollout_logprob_max_diff"] = diff
                compared = f"rollout log-probs equal the training pass's to {diff:.2g}"
            else:
                compared = "rollout log-probs not compared (top-k / top-p sampling)"
            if start == 0:
                print_main(dist.is_main, f"check: before any update the ratio is 1 to {checks['check/first_ratio_dev']:.2g} "
                           f"and the approximate KL {checks['check/first_approxkl']:.2g}; {compared}")
        if cfg.gold_eval.prompts and cfg.gold_eval.interval and iteration % cfg.gold_eval.interval == 0 \
                and iteration < iterations:  # the last one is the export's, below
            metrics["gold/score"] = gold_during_training(engine, actor, tokenizer, cfg.gold_eval, iteration)
        for message in health.check(metrics, buffer["groups"], cfg.kl_target):
            print_main(dist.is_main, f"warning: iteration {iteration}: {message}")
        run.logger.log(metrics, iteration)
        progress.update(int(mask.sum()), score=metrics["objective/scores"], kl=metrics["objective/kl"])
        loop.step_boundary(run, models, iteration, iterations, 0, order, extra={"kl_coef": kl_ctl.value})
    progress.close()

    # Export: the policy to final/ (verified), the critic to final/critic/; training is over, so without
    # Adam's moments.
    for trained in (actor, critic):
        if trained is not None:
            engine.release_optimizer_state(trained)
    final = export_model(engine, actor, tokenizer, run.output_dir / "final", kind="causal_lm", base_path=model_path,
                         lora_cfg=recipe.lora, precision=t.precision, model_cfg=recipe.model)
    if critic is not None:
        export_model(engine, critic, tokenizer, run.output_dir / "final" / "critic", kind="reward",
                     base_path=critic_path, lora_cfg=recipe.lora, precision=t.precision, model_cfg=recipe.model)
    print_main(dist.is_main, f"exported and verified: {final}")
    if cfg.gold_eval.prompts:
        gold["after"] = gold_eval(engine, str(final), cfg.gold_eval, recipe.model,
                                   samples_to=Path(recipe.output_dir) / "gold_samples_after.jsonl")
        run.logger.log({"gold/score": gold["after"]["gold/score"]}, step=iterations)
        if "before" in gold:
            print_main(dist.is_main, f"gold score: {gold['before']['gold/score']:.3f} before -> "
                       f"{gold['after']['gold/score']:.3f} after")
    loop.finish(run, {**metrics, **gold.get("after", {})})
    return {"metrics": metrics, "gold": gold, "data": [report.as_dict()]}


def gold_during_training(engine, actor, tokenizer, g: GoldEvalConfig, iteration: int) -> float:
    """The gold score of the policy as it trains (its training weights and precision, in memory): the curve
    between the before and after scores, which load the exports."""
    with engine.generation_view(actor) as policy:
        score = gold_score_of_model(engine, policy, tokenizer, g.prompts, g.num_prompts, g.max_new_tokens,
                                    g.batch_size)["gold/score"]
    print_main(engine.dist.is_main, f"iteration {iteration}: gold score {score:.3f} (training weights)")
    return score


def train_on_rollout(engine, cfg: PPOConfig, actor, critic, buffer: dict, update: dict, mask: torch.Tensor,
                     pad_id: int, iteration: int, beta: float, kl_name: str, kl_in: str, seed: int) -> dict:
    """Step 6: cfg.epochs passes over the rollout in minibatches of train.global_batch_size episodes; rank r
    takes micro-batches as GlobalBatchSampler does, so every split over ranks makes the same updates."""
    sizes, dist = engine.layout, engine.dist
    n = mask.shape[0]
    G, micro, world = sizes.global_batch_size, sizes.micro_batch_size, dist.world_size
    unit = normaliser_unit(cfg.loss_aggregation)
    sums = {"loss": 0.0, "policy_loss": 0.0, "value_loss": 0.0, "clipfrac": 0.0, "approxkl": 0.0, "entropy": 0.0,
            "ratio": 0.0, "vf_clipfrac": 0.0, "tokens": 0.0, "kl_loss": 0.0}
    first = {}
    lr = engine.current_lr(actor)
    group = cfg.samples_per_prompt if cfg.share_prompt else 1  # minibatches take whole groups when packing them
    for epoch in range(cfg.epochs):
        order = list(range(n // group))
        random.Random(episode_seed(seed, iteration, epoch, 0)).shuffle(order)
        order = [g * group + k for g in order for k in range(group)]
        for m in range(n // G):
            chosen = order[m * G : (m + 1) * G]
            mine = [chosen[(k * world + dist.rank) * micro : (k * world + dist.rank + 1) * micro]
                    for k in range(sizes.grad_accum_steps)]
            denominator = float(mask[chosen].sum()) if unit == "tokens" else float(len(chosen))

            def batch_of(idx):
                b = layout([buffer["prompt_ids"][i] for i in idx], [buffer["response_ids"][i] for i in idx], group,
                           pad_id, dist.device, cfg.temperature)
                width = b["response_mask"].shape[1]
                b.update({k: v[idx, :width].to(dist.device) for k, v in update.items()})
                return b

            micro_batches = [batch_of(idx) for idx in mine]

            def actor_loss(model, b):
                logp, entropy = response_logprobs(model, b, entropy="grad" if cfg.entropy_coef else "value")
                token_mask = b["response_mask"]
                pg, clipped = policy_loss(logp, b["old_logp"], b["advantages"], cfg.clip_low, cfg.clip_high,
                                          cfg.dual_clip)
                pg_term = aggregate(pg, token_mask, cfg.loss_aggregation, cfg.max_new_tokens)
                loss = pg_term
                kl_term = torch.zeros((), device=logp.device)
                if kl_in == "loss":
                    kl_term = aggregate(kl_estimate(logp, b["ref_logp"], kl_name), token_mask, cfg.loss_aggregation,
                                        cfg.max_new_tokens)
                    loss = loss + beta * kl_term
                if cfg.entropy_coef:
                    loss = loss - cfg.entropy_coef * aggregate(entropy, token_mask, cfg.loss_aggregation,
                                                               cfg.max_new_tokens)
                ratio = torch.exp(logp - b["old_logp"]).detach()
                return loss, {"loss": loss.item(), "policy_loss": pg_term.item(), "kl_loss": kl_term.item(),
                              "clipfrac": float((clipped.float() * token_mask).sum()),
                              "approxkl": float((0.5 * (logp.detach() - b["old_logp"]) ** 2 * token_mask).sum()),
                              "entropy": float((entropy.detach() * token_mask).sum()),
                              "ratio": float((ratio * token_mask).sum()), "tokens": float(token_mask.sum()),
                              "ratio_dev": float(((ratio - 1).abs() * token_mask).sum())}

            def count(b):
                return float(b["response_mask"].sum()) if unit == "tokens" else float(b["response_mask"].shape[0])

            out = loop.accumulated_step(engine, actor, micro_batches, count, actor_loss, iteration)
            assert abs(out["count"] - denominator) < 1e-6  # the normaliser is the global minibatch's
            if not first:  # before this rollout's first update the actor is the policy that sampled it
                first = {"first_ratio_dev": out["ratio_dev"] / max(out["tokens"], 1.0),
                         "first_approxkl": out["approxkl"] / max(out["tokens"], 1.0)}
            for key in ("loss", "policy_loss", "kl_loss", "clipfrac", "approxkl", "entropy", "ratio", "tokens"):
                sums[key] += out[key]
            if critic is not None:
                def critic_loss(model, b):
                    v = token_values(model, b)
                    losses, clipped = value_loss(v, b["values"], b["returns"], cfg.value_clip)
                    loss = cfg.vf_coef * aggregate(losses, b["response_mask"], "token_mean")
                    return loss, {"value_loss": aggregate(losses, b["response_mask"], "token_mean").item(),
                                  "vf_clipfrac": float((clipped.float() * b["response_mask"]).sum())}

                vout = loop.accumulated_step(engine, critic, micro_batches, lambda b: float(b["response_mask"].sum()),
                                             critic_loss, iteration)
                sums["value_loss"] += vout["value_loss"]
                sums["vf_clipfrac"] += vout["vf_clipfrac"]
    tokens = max(sums["tokens"], 1.0)
    updates = cfg.epochs * (n // G)
    per = tokens if unit == "tokens" else updates * G  # the aggregation's own denominator, over all updates
    return {"loss": sums["loss"] / per, "loss/policy": sums["policy_loss"] / per, "loss/kl": sums["kl_loss"] / per,
            "loss/value": sums["value_loss"] / tokens, "policy/clipfrac": sums["clipfrac"] / tokens,
            "policy/approxkl": sums["approxkl"] / tokens, "policy/ratio": sums["ratio"] / tokens,
            "objective/entropy": sums["entropy"] / tokens, "val/clipfrac": sums["vf_clipfrac"] / tokens,
            "lr": lr, **first}


class Clock:
    def __init__(self):
        self.last, self.times = time.perf_counter(), {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name], self.last = now - self.last, now


def iteration_metrics(buffer, mask, seq_kl, beta, stats, values, returns, clock: Clock, episodes: int) -> dict:
    sampled = ~buffer["guided"]  # the policy's own responses (ppo.guidance adds reference answers)
    scores = buffer["scores"][sampled]
    seq_kl = seq_kl[sampled]
    lengths = mask[sampled].sum(dim=1)
    out = {"objective/scores": float(scores.mean()), "objective/scores_std": float(scores.std()) if len(scores) > 1 else 0.0,
           "objective/kl": float(seq_kl.mean()), "objective/kl_coef": beta,
           "objective/rlhf_reward": float((scores - beta * seq_kl).mean()),
           "response/length": float(lengths.mean()), "response/length_max": float(lengths.max()),
           "response/no_eos_share": float((~buffer["ended"][sampled]).float().mean()),
           "rollout/guided_share": float(buffer["guided"].float().mean()),
           **stats,
           **{f"time/{k}": v for k, v in clock.times.items()},
           "train/episodes_per_s": episodes / max(sum(clock.times.values()), 1e-9)}
    for key, value in buffer.items():
        if key.startswith("score:"):
            out[f"objective/score/{key[6:]}"] = float(value[sampled].mean())
    if returns is not None:
        out["val/explained_variance"] = adv.explained_variance(values, returns, mask)
        out["val/mean"] = float(adv.masked_mean(values, mask))
    return out


class Health:
    """Warnings a PPO user needs before the curves go bad: KL negative or far past its target, entropy
    collapse, groups whose samples are all the same, responses that stop stopping."""

    def __init__(self, cfg: PPOConfig, group_size: int):
        self.cfg, self.group_size = cfg, group_size
        self.no_eos: list[float] = []

    def check(self, m: dict, groups: list[list[str]], target: float | None) -> list[str]:
        out = []
        if m["objective/kl"] < -0.05:
            out.append(f"mean KL {m['objective/kl']:.3f} < 0: the rollout is not sampled from the policy the KL is "
                       "measured against (sampling settings, or a reference that is not the start model)")
        if target is not None and m["objective/kl"] > 3 * target:
            out.append(f"mean KL {m['objective/kl']:.3f} is past 3x its target {target}")
        if m["objective/entropy"] < 0.05:
            out.append(f"entropy {m['objective/entropy']:.3f} nats per token: the policy is collapsing")
        if self.group_size > 1 and self.cfg.advantage in ("grpo", "rloo"):  # GAE and REINFORCE++ need no groups
            same = sum(len(set(g)) == 1 for g in groups) / max(len(groups), 1)
            if same > 0.5:
                out.append(f"{same:.0%} of prompts got {self.group_size} identical responses: no signal for "
                           "group baselines (raise the temperature or the group size)")
        self.no_eos.append(m["response/no_eos_share"])
        if len(self.no_eos) >= 3 and self.no_eos[-1] > 0.3 and self.no_eos[-1] > self.no_eos[0] + 0.2:
            out.append(f"{self.no_eos[-1]:.0%} of responses hit max_new_tokens without stopping (from "
                       f"{self.no_eos[0]:.0%}); consider ppo.missing_eos_penalty")
        return out
