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
  7. log: objective/*, policy/*, loss/*, val/*, response/*, time/* (alignment.rlhf.health).
The math of steps 2-6 is alignment.rlhf (pure tensor functions, tested by hand); the episodes' bookkeeping
(prompts per iteration, seeds, layouts, gathering across ranks) is alignment.rlhf.episodes. Where this
departs from the papers: a response's score sits on its last token (the EOS, or the last generated token when
it has none); the first iteration checks that the rollout's log-probs equal the training pass's and that the
ratio is 1 before any update.
"""

from __future__ import annotations

import importlib
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from alignment.builtin import task
from alignment.core import loop
from alignment.core.checkpoint import read_state
from alignment.core.config import RecipeError
from alignment.core.fingerprint import sequence_fingerprint
from alignment.core.modeling import response_logprobs, user_model
from alignment.core.models import count_parameters, load_model, load_tokenizer, resolve_model_path
from alignment.core.recipes import GoldEvalConfig, PPOConfig, PPORecipe, kl_placement, rollout_correction
from alignment.core.tracking import print_main
from alignment.data import text
from alignment.data.layout import episode_batch
from alignment.data.prompts import PromptSet, load_prompts
from alignment.data.report import DataReport
from alignment.data.sources import DataError, read_splits
from alignment.errors import UserError
from alignment.evaluate.gold import gold_score_of_model
from alignment.rlhf import advantages as adv
from alignment.rlhf.episodes import (
    episode_seed,
    forward_in_chunks,
    gather_rollout,
    informative_groups,
    rollout_prompts,
    training_layout,
)
from alignment.rlhf.health import Health, iteration_metrics
from alignment.rlhf.importance import mismatch_stats, truncated_importance_weights
from alignment.rlhf.kl import KLController, kl_estimate
from alignment.rlhf.ppo_losses import aggregate, normaliser_unit, policy_loss, value_loss
from alignment.rlhf.rewards import kl_shaped_rewards
from alignment.rlhf.rollout import KVCacheSampler, Rollout, is_tempered, is_untruncated
from alignment.stages import tail
from reward.model import ensure_distinct_pad, token_values
from reward.scorer import RewardScorer

# ---------------------------------------------------------------------------
# Setup: prompts, roles, reward sources
# ---------------------------------------------------------------------------


class RewardError(UserError):
    """A reward source that does not give one finite number per response."""


def function_source(spec: str):
    """A `module:function` reward, called as function(prompts, responses, rows) -> one float per response, each
    result checked (the first rollout's check comes before any update)."""
    module, _, name = spec.partition(":")
    fn = getattr(importlib.import_module(module), name)

    def call(prompts, responses, rows) -> list[float]:
        try:
            values = list(fn(prompts, responses, rows))
        except Exception as exc:
            raise RewardError(f"ppo.rewards: {spec} raised {type(exc).__name__}: {exc}") from exc
        if len(values) != len(responses):
            raise RewardError(f"ppo.rewards: {spec} returned {len(values)} values for {len(responses)} responses; a "
                              "reward function returns one number per response, in their order")
        out = []
        for i, value in enumerate(values):
            try:  # a number, or a NumPy / torch scalar; not a string or a bool
                number = None if isinstance(value, (str, bytes, bool)) else float(value)
            except (TypeError, ValueError):
                number = None
            if number is None or not math.isfinite(number):
                raise RewardError(f"ppo.rewards: {spec} returned {value!r} for response {i} ({responses[i][:40]!r}); "
                                  "each value must be a finite number")
            out.append(number)
        return out

    return call


class Rewards:
    """Step 2's sources, weighted: the built-in verifier (`gold`), reward models (a directory, frozen in the
    engine) and `module:function` rewards."""

    def __init__(self, engine, cfg: PPOConfig, policy_tokenizer, trust_remote_code: bool):
        self.cfg, self.policy_tokenizer = cfg, policy_tokenizer
        self.sources = []
        for source in cfg.rewards:
            if source.source == "gold":
                fn = function_source("alignment.evaluate.rewards:gold")
            elif Path(source.source).expanduser().exists():
                fn = RewardScorer.in_engine(engine, source.source, source.normalize, trust_remote_code)
            else:
                fn = function_source(source.source)
            self.sources.append((source, fn))

    def first_reward_model(self) -> str | None:
        return next((s.source for s, fn in self.sources if isinstance(fn, RewardScorer)), None)

    def __call__(self, prompts, rollout: Rollout, texts: list[str], rows: list[dict]):
        """(scores [B], {source: scores [B]}): the weighted sum, less ppo.missing_eos_penalty for responses that
        did not stop, clipped to ppo.score_clip; and each source's own scores."""
        scores = torch.zeros(len(rollout))
        per_source = {}
        for source, fn in self.sources:
            if isinstance(fn, RewardScorer):
                ids = [fn.read_policy_ids(p, pi, r, e, self.policy_tokenizer) for p, pi, r, e in
                       zip(prompts, rollout.prompt_ids, rollout.response_ids, rollout.ended)]
                values = fn.score_batched(ids, self.cfg.rollout_batch_size)
            else:
                values = fn(prompts, texts, rows)
            per_source[source.source] = torch.tensor(values, dtype=torch.float32)
            scores += source.weight * per_source[source.source]
        if self.cfg.missing_eos_penalty is not None:
            scores = scores - self.cfg.missing_eos_penalty * (~torch.tensor(rollout.ended, dtype=torch.bool)).float()
        if self.cfg.score_clip is not None:
            scores = scores.clamp(-self.cfg.score_clip, self.cfg.score_clip)
        return scores, per_source


@dataclass
class Setup:
    """Everything an iteration uses, made once (and restored on --resume)."""

    job: loop.Run
    cfg: PPOConfig
    tokenizer: object
    prompts: PromptSet
    actor: object
    reference: object  # a frozen model; None with LoRA (the actor with its adapter off)
    critic: object      # gae only
    critic_path: str | None
    rewards: Rewards
    kl_ctl: KLController
    gold: tail.Gold
    order: dict
    model_path: str
    iterations: int
    start: int
    report: DataReport


def load_ppo_prompts(job: loop.Run, recipe: PPORecipe, tokenizer) -> tuple[PromptSet, DataReport]:
    rows, _ = read_splits(recipe.data, recipe.seed)
    report = DataReport("prompts", rows.described)
    prompts = load_prompts(rows, tokenizer, recipe.ppo.max_prompt_length or recipe.data.max_length, report,
                           recipe.data.on_bad_row)
    tail.report_data(job, [report])
    if len(prompts.ids) < recipe.ppo.prompts_per_rollout:
        raise DataError(f"{recipe.data.train}: {len(prompts.ids)} usable prompts, fewer than ppo.prompts_per_rollout")
    return prompts, report


def load_critic(engine, recipe: PPORecipe, path: str, steps: int):
    """gae's critic: a scalar head on `path` (the first reward model, ppo.critic, or the policy), trained."""
    def before_adapters(model):
        ensure_distinct_pad(load_tokenizer(path, recipe.model.trust_remote_code), model)

    critic = loop.load_trainable_model(engine, recipe, path, "reward", before_adapters,
                                       disable_dropout=recipe.ppo.disable_dropout)
    print_main(engine.dist.is_main, f"critic from {path}")
    return engine.prepare(critic, steps, learning_rate=recipe.ppo.critic_learning_rate)


def warn_about_sampling(is_main: bool, cfg: PPOConfig) -> None:
    if not is_untruncated(cfg.top_k, cfg.top_p):
        print_main(is_main, f"warning: sampling with top_k {cfg.top_k}, top_p {cfg.top_p} truncates the policy's "
                   "distribution: the KL estimate and the importance ratio no longer hold exactly")
    elif is_tempered(cfg.temperature):
        print_main(is_main, f"sampling at temperature {cfg.temperature}: the policy trained, its ratio, entropy and "
                   f"KL to the reference are those of softmax(logits / {cfg.temperature}), the distribution sampled; "
                   "greedy decoding (the gold score) is the same either way")


def setup(recipe: PPORecipe, resume: bool, overwrite: bool) -> Setup:
    """The run, prompts, actor, reference, reward sources, critic and KL controller; resumed when asked."""
    cfg = recipe.ppo
    kl_in, kl_name = kl_placement(cfg)
    job, checkpoint = loop.setup_run(recipe, "ppo", resume, overwrite)
    engine = job.engine
    is_main = engine.dist.is_main
    if cfg.prompts_per_rollout % engine.dist.world_size:
        raise RecipeError(f"ppo.prompts_per_rollout ({cfg.prompts_per_rollout}) must be a multiple of the world "
                          f"size ({engine.dist.world_size}): each rank samples whole groups")
    warn_about_sampling(is_main, cfg)
    model_path = resolve_model_path(recipe.model.name_or_path, recipe.model.revision)
    tokenizer = load_tokenizer(recipe.model.tokenizer or model_path, recipe.model.trust_remote_code, recipe.model.revision)
    prompts, report = load_ppo_prompts(job, recipe, tokenizer)
    episodes = cfg.prompts_per_rollout * cfg.samples_per_prompt
    updates = cfg.epochs * episodes // engine.layout.global_batch_size
    iterations = loop.total_steps(recipe, len(prompts.ids) // cfg.prompts_per_rollout)
    order = loop.data_order(sequence_fingerprint(prompts.ids), len(prompts.ids), engine, recipe.seed)
    order["prompts_per_rollout"] = cfg.prompts_per_rollout
    loop.check_resume(checkpoint, order)

    actor = loop.load_trainable_model(engine, recipe, model_path, "causal_lm", disable_dropout=cfg.disable_dropout)
    trainable, total = count_parameters(actor)
    print_main(is_main, f"actor {recipe.model.name_or_path}: {total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M "
               f"trainable; {cfg.advantage}, KL {kl_name} in the {kl_in} (coef {cfg.kl_coef}); {iterations} iterations "
               f"of {cfg.prompts_per_rollout} prompts x {cfg.samples_per_prompt} samples, {updates} updates each")
    actor = engine.prepare(actor, iterations * updates)
    reference = None
    if not recipe.lora.enabled:
        with engine.model_init(trainable=False):
            reference = engine.prepare_frozen(load_model(model_path, "causal_lm", revision=recipe.model.revision,
                                                         trust_remote_code=recipe.model.trust_remote_code,
                                                         attn_implementation=loop.attention_implementation(engine, recipe)))
    rewards = Rewards(engine, cfg, tokenizer, recipe.model.trust_remote_code)
    critic = critic_path = None
    if cfg.advantage == "gae":
        critic_path = cfg.critic or rewards.first_reward_model() or model_path
        critic = load_critic(engine, recipe, critic_path, iterations * updates)
    kl_ctl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    reach = kl_ctl.reach(episodes, iterations)
    if cfg.kl_target is not None and reach < 2.0:
        print_main(is_main, f"warning: ppo.kl_target {cfg.kl_target}: over {iterations} iterations of {episodes} "
                   f"episodes the controller can move ppo.kl_coef by at most x{reach:.3g} (ppo.kl_horizon "
                   f"{cfg.kl_horizon} episodes); lower ppo.kl_horizon (e.g. {max(1, episodes * iterations // 10)}) "
                   "for the target to bind")
    start = loop.resume(job, checkpoint, {"policy": actor, **({"critic": critic} if critic is not None else {})})
    if checkpoint is not None:
        kl_ctl.value = float(read_state(checkpoint).get("kl_coef", kl_ctl.value))
    gold = tail.score_start(job, model_path, cfg.gold_eval, start)
    if gold.before is not None and cfg.gold_eval.interval:  # the same weights in training form: the curve's start
        job.logger.log({"gold/score": gold_during_training(engine, actor, tokenizer, cfg.gold_eval, 0)}, step=0)
    return Setup(job, cfg, tokenizer, prompts, actor, reference, critic, critic_path, rewards, kl_ctl, gold, order,
                 model_path, iterations, start, report)


def gold_during_training(engine, actor, tokenizer, g: GoldEvalConfig, iteration: int) -> float:
    """The gold score of the policy as it trains (its training weights and precision, in memory): the curve
    between the before and after scores, which load the exports."""
    with engine.generation_view(actor) as policy:
        score = gold_score_of_model(engine, policy, tokenizer, g.prompts, g.num_prompts, g.max_new_tokens,
                                    g.batch_size)["gold/score"]
    print_main(engine.dist.is_main, f"iteration {iteration}: gold score {score:.3f} (training weights)")
    return score


# ---------------------------------------------------------------------------
# Steps 1-3: rollout, scores, log-probs
# ---------------------------------------------------------------------------


@dataclass
class Sampled:
    """This rank's episodes of one iteration: K adjacent samples a prompt."""

    rollout: Rollout
    prompt_index: list[int]  # each episode's prompt (an index into the PromptSet)
    texts: list[str]         # decoded responses, special tokens dropped
    guided: torch.Tensor     # [B] bool: a reference answer put in by ppo.guidance, not sampled

    def keep(self, indices: list[int]) -> None:
        self.rollout = self.rollout.subset(indices)
        self.prompt_index = [self.prompt_index[i] for i in indices]
        self.texts = [self.texts[i] for i in indices]
        self.guided = self.guided[indices]


def sample(s: Setup, iteration: int, seed: int) -> Sampled:
    """Step 1: this rank's prompts (oversampled for dynamic sampling), K samples each, one seed per episode."""
    cfg, engine = s.cfg, s.job.engine
    K, dist = cfg.samples_per_prompt, engine.dist
    indices = rollout_prompts(len(s.prompts.ids), cfg.prompts_per_rollout * cfg.oversample, iteration, seed)
    per_rank = cfg.prompts_per_rollout * cfg.oversample // dist.world_size
    mine = indices[dist.rank * per_rank : (dist.rank + 1) * per_rank]
    seeds = [episode_seed(seed, iteration, i, k) for i in mine for k in range(K)]
    prompt_index = [i for i in mine for _ in range(K)]
    with engine.generation_view(s.actor) as policy:
        sampler = KVCacheSampler(policy, max_new_tokens=cfg.max_new_tokens, stop_ids=text.stop_token_ids(s.tokenizer),
                                 pad_id=s.tokenizer.pad_token_id, batch_size=cfg.rollout_batch_size,
                                 temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, device=dist.device)
        rollout = sampler([s.prompts.ids[i] for i in prompt_index], seeds)
    texts = [s.tokenizer.decode(r, skip_special_tokens=True) for r in rollout.response_ids]
    return Sampled(rollout, prompt_index, texts, torch.zeros(len(rollout), dtype=torch.bool))


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


def guide(s: Setup, sampled: Sampled) -> None:
    """Step 1b (ppo.guidance: reference): the reference answer replaces the last sample of each group with no
    right answer."""
    K, rollout, stops = s.cfg.samples_per_prompt, sampled.rollout, text.stop_token_ids(s.tokenizer)
    rows = [s.prompts.rows[i] for i in sampled.prompt_index]
    for g in all_wrong_groups(sampled.texts, rows, K):
        last = g * K + K - 1
        prompt = s.prompts.prompts[sampled.prompt_index[last]]
        rollout.response_ids[last] = reference_response(s.tokenizer, prompt, rows[last], s.cfg.max_new_tokens, stops)
        rollout.ended[last] = rollout.response_ids[last][-1] in stops
        if rollout.logprobs:  # not sampled: nothing to compare with the training pass
            rollout.logprobs[last] = [float("nan")] * len(rollout.response_ids[last])
        sampled.texts[last] = s.tokenizer.decode(rollout.response_ids[last], skip_special_tokens=True)
        sampled.guided[last] = True


def score(s: Setup, sampled: Sampled) -> tuple[torch.Tensor, dict, dict]:
    """Step 2: every response scored by every source; then dynamic sampling keeps the groups that carry signal.
    Returns the kept episodes' scores and per-source scores, and what was sampled before the choice."""
    cfg, K = s.cfg, s.cfg.samples_per_prompt
    prompts = [s.prompts.prompts[i] for i in sampled.prompt_index]
    rows = [s.prompts.rows[i] for i in sampled.prompt_index]
    scores, per_source = s.rewards(prompts, sampled.rollout, sampled.texts, rows)
    # Every sampled response's score, before dynamic sampling keeps the informative groups: the policy's own
    # score (objective/scores, over the kept groups, runs higher whenever oversample > 1).
    before = {"informative": float((scores.view(-1, K).std(dim=1) > 0).float().mean()) if K > 1 else float("nan"),
              "sum": float(scores[~sampled.guided].sum()), "n": float((~sampled.guided).sum())}
    if cfg.oversample > 1:
        keep = informative_groups(scores, K, cfg.prompts_per_rollout // s.job.engine.dist.world_size)
        sampled.keep(keep)
        scores, per_source = scores[keep], {k: v[keep] for k, v in per_source.items()}
    return scores, per_source, before


def logprobs(s: Setup, sampled: Sampled, scores: torch.Tensor, per_source: dict) -> dict:
    """Step 3: log-probs of the actor as it sampled (in training-shaped micro-batches: the ratio compares with
    them) and of the reference, the critic's values; the whole rollout gathered on every rank."""
    cfg, engine = s.cfg, s.job.engine
    pad_id, device, micro = s.tokenizer.pad_token_id, engine.dist.device, engine.layout.micro_batch_size
    K, rollout, tau = cfg.samples_per_prompt, sampled.rollout, cfg.temperature
    group = K if cfg.share_prompt else 1
    chunk = cfg.forward_batch_size or 4 * micro
    old_logp = forward_in_chunks(response_logprobs, s.actor, rollout, pad_id, device, micro, group, tau)
    if s.reference is not None:
        ref_logp = forward_in_chunks(response_logprobs, s.reference, rollout, pad_id, device, chunk, group, tau)
    else:
        with user_model(s.actor).disable_adapter():
            ref_logp = forward_in_chunks(response_logprobs, s.actor, rollout, pad_id, device, chunk, group, tau)
    values = (forward_in_chunks(token_values, s.critic, rollout, pad_id, device, chunk, group)
              if s.critic is not None else torch.zeros_like(old_logp))
    sampled_logp = torch.zeros(len(rollout), old_logp.shape[1])
    for i, row in enumerate(rollout.logprobs):
        sampled_logp[i, : len(row)] = torch.tensor(row)
    texts = sampled.texts
    local = {"prompt_ids": rollout.prompt_ids, "response_ids": rollout.response_ids, "scores": scores,
             "ended": torch.tensor(rollout.ended, dtype=torch.bool), "guided": sampled.guided, "old_logp": old_logp,
             "ref_logp": ref_logp, "values": values, "sampled_logp": sampled_logp,
             "groups": [texts[i : i + K] for i in range(0, len(texts), K)],
             **{f"score:{k}": v for k, v in per_source.items()}}
    return gather_rollout(engine, local)  # every rank: the whole rollout, in rank order


# ---------------------------------------------------------------------------
# Steps 4-6: KL-shaped rewards, advantages, the update
# ---------------------------------------------------------------------------


def advantages_and_returns(cfg: PPOConfig, buffer: dict, rewards, values, mask, seq_kl, beta: float):
    """Step 5: GAE with the critic, discounted returns (REINFORCE++), or per-episode group advantages of the
    outcome (GRPO, RLOO; less the KL when it is in the reward), spread over the response's tokens."""
    kl_in, _ = kl_placement(cfg)
    returns = None
    if cfg.advantage == "gae":
        advantages, returns = adv.gae(rewards, values, mask, cfg.gamma, cfg.lam)
    elif cfg.advantage == "reinforce_pp":
        advantages = adv.discounted_returns(rewards, mask, cfg.gamma)
    else:
        outcome = buffer["scores"] - (beta * seq_kl if kl_in == "reward" else 0.0)
        per_episode = (adv.group_advantages(outcome, cfg.samples_per_prompt, cfg.grpo_scale)
                       if cfg.advantage == "grpo" else adv.leave_one_out_advantages(outcome, cfg.samples_per_prompt))
        advantages = per_episode[:, None] * mask
    if cfg.whiten_advantages and cfg.advantage in ("gae", "reinforce_pp"):
        advantages = adv.masked_whiten(advantages, mask)
    return advantages, returns


def actor_loss_fn(cfg: PPOConfig, beta: float, correction: str | None):
    """The actor's micro-batch loss: clipped policy gradient, the KL term when it is in the loss, an entropy
    bonus when asked; aggregated as ppo.loss_aggregation says, with metric sums.

    In a rollout's first minibatch the actor is still the policy that sampled it, so pi_old is this very pass's
    log-probs, detached (the ratio is exactly 1), as TRL does when it takes one step per generation: log-probs
    from the earlier old-logp pass, in other micro-batch shapes, differ from this pass's by up to tenths of a nat
    in bf16, and that noise alone clipped ~1% of the tokens of an on-policy step and turned its update (cosine
    0.81 to the fp32 update, against 0.95 this way). The truncated importance weights (pi_old / pi_rollout) are
    then taken against this pass too. Later minibatches use the stored pass."""
    kl_in, kl_name = kl_placement(cfg)

    def fn(model, b):
        logp, entropy = response_logprobs(model, b, entropy="grad" if cfg.entropy_coef else "value")
        token_mask = b["response_mask"]
        old_logp = logp.detach() if b.get("on_policy") else b["old_logp"]
        pg, clipped = policy_loss(logp, old_logp, b["advantages"], cfg.clip_low, cfg.clip_high, cfg.dual_clip)
        if correction:  # truncated importance sampling for the rollout's numerics (rlhf.importance)
            pg = pg * truncated_importance_weights(old_logp, b["rollout_logp"], token_mask, correction,
                                                   cfg.rollout_correction_cap)
        pg_term = aggregate(pg, token_mask, cfg.loss_aggregation, cfg.max_new_tokens)
        loss = pg_term
        kl_term = torch.zeros((), device=logp.device)
        if kl_in == "loss":
            kl_term = aggregate(kl_estimate(logp, b["ref_logp"], kl_name), token_mask, cfg.loss_aggregation,
                                cfg.max_new_tokens)
            loss = loss + beta * kl_term
        if cfg.entropy_coef:
            loss = loss - cfg.entropy_coef * aggregate(entropy, token_mask, cfg.loss_aggregation, cfg.max_new_tokens)
        ratio = torch.exp(logp - old_logp).detach()
        stored = torch.exp(logp - b["old_logp"]).detach()  # against the stored pass: its numerics, on-policy
        return loss, {"loss": loss.item(), "policy_loss": pg_term.item(), "kl_loss": kl_term.item(),
                      "clipfrac": float((clipped.float() * token_mask).sum()),
                      "approxkl": float((0.5 * (logp.detach() - b["old_logp"]) ** 2 * token_mask).sum()),
                      "entropy": float((entropy.detach() * token_mask).sum()),
                      "ratio": float((ratio * token_mask).sum()), "tokens": float(token_mask.sum()),
                      "ratio_dev": float(((stored - 1).abs() * token_mask).sum())}

    return fn


def critic_loss_fn(cfg: PPOConfig):
    def fn(model, b):
        v = token_values(model, b)
        losses, clipped = value_loss(v, b["values"], b["returns"], cfg.value_clip)
        loss = cfg.vf_coef * aggregate(losses, b["response_mask"], "token_mean")
        return loss, {"value_loss": aggregate(losses, b["response_mask"], "token_mean").item(),
                      "vf_clipfrac": float((clipped.float() * b["response_mask"]).sum())}

    return fn


def train_on_rollout(engine, cfg: PPOConfig, actor, critic, buffer: dict, update: dict, mask: torch.Tensor,
                     pad_id: int, iteration: int, beta: float, seed: int, correction: str | None) -> dict:
    """Step 6: cfg.epochs passes over the rollout in minibatches of train.global_batch_size episodes; rank r
    takes micro-batches as GlobalBatchSampler does, so every split over ranks makes the same updates."""
    sizes, dist = engine.layout, engine.dist
    n = mask.shape[0]
    G, micro, world = sizes.global_batch_size, sizes.micro_batch_size, dist.world_size
    unit = normaliser_unit(cfg.loss_aggregation)
    sums = dict.fromkeys(("loss", "policy_loss", "value_loss", "clipfrac", "approxkl", "entropy", "ratio",
                          "vf_clipfrac", "tokens", "kl_loss"), 0.0)
    first = {}
    lr = engine.current_lr(actor)
    group = cfg.samples_per_prompt if cfg.share_prompt else 1  # minibatches take whole groups when packing them
    actor_loss, critic_loss = actor_loss_fn(cfg, beta, correction), critic_loss_fn(cfg)

    def batch_of(idx):
        b = training_layout([buffer["prompt_ids"][i] for i in idx], [buffer["response_ids"][i] for i in idx], group,
                            pad_id, dist.device, cfg.temperature)
        width = b["response_mask"].shape[1]
        b.update({k: v[idx, :width].to(dist.device) for k, v in update.items()})
        return b

    def count(b):
        return float(b["response_mask"].sum()) if unit == "tokens" else float(b["response_mask"].shape[0])

    for epoch in range(cfg.epochs):
        order = list(range(n // group))
        random.Random(episode_seed(seed, iteration, epoch, 0)).shuffle(order)
        order = [g * group + k for g in order for k in range(group)]
        for m in range(n // G):
            chosen = order[m * G : (m + 1) * G]
            mine = [chosen[(k * world + dist.rank) * micro : (k * world + dist.rank + 1) * micro]
                    for k in range(sizes.grad_accum_steps)]
            micro_batches = [batch_of(idx) for idx in mine]
            for b in micro_batches:  # no update since the rollout yet: pi_old is the training pass itself
                b["on_policy"] = epoch == 0 and m == 0
            out = loop.accumulated_step(engine, actor, micro_batches, count, actor_loss, iteration)
            denominator = float(mask[chosen].sum()) if unit == "tokens" else float(len(chosen))
            assert abs(out["count"] - denominator) < 1e-6  # the normaliser is the global minibatch's
            if not first:  # before this rollout's first update the actor is the policy that sampled it
                first = {"first_ratio_dev": out["ratio_dev"] / max(out["tokens"], 1.0),
                         "first_approxkl": out["approxkl"] / max(out["tokens"], 1.0)}
            for key in ("loss", "policy_loss", "kl_loss", "clipfrac", "approxkl", "entropy", "ratio", "tokens"):
                sums[key] += out[key]
            if critic is not None:
                vout = loop.accumulated_step(engine, critic, micro_batches, lambda b: float(b["response_mask"].sum()),
                                             critic_loss, iteration)
                sums["value_loss"] += vout["value_loss"]
                sums["vf_clipfrac"] += vout["vf_clipfrac"]
    tokens = max(sums["tokens"], 1.0)
    per = tokens if unit == "tokens" else cfg.epochs * (n // G) * G  # the aggregation's own denominator
    return {"loss": sums["loss"] / per, "loss/policy": sums["policy_loss"] / per, "loss/kl": sums["kl_loss"] / per,
            "loss/value": sums["value_loss"] / tokens, "policy/clipfrac": sums["clipfrac"] / tokens,
            "policy/approxkl": sums["approxkl"] / tokens, "policy/ratio": sums["ratio"] / tokens,
            "objective/entropy": sums["entropy"] / tokens, "val/clipfrac": sums["vf_clipfrac"] / tokens,
            "lr": lr, **first}


# ---------------------------------------------------------------------------
# Step 7 and the stage
# ---------------------------------------------------------------------------


def rollout_logprobs(buffer: dict, T: int) -> torch.Tensor:
    """[B, T] log-probs of the sampled tokens under the rollout's own distribution; NaN rows for responses that
    were not sampled (ppo.guidance's reference answers)."""
    out = buffer["sampled_logp"][:, :T].clone()
    out[buffer["guided"]] = float("nan")
    return out


def first_iteration_check(s: Setup, buffer: dict, old_lp: torch.Tensor, mask: torch.Tensor, metrics: dict) -> None:
    """Before any update the ratio is 1 and the approximate KL 0; the rollout's log-probs equal the training
    pass's (untruncated sampling only: top-k / top-p draw from a distribution no training pass computes)."""
    if is_untruncated(s.cfg.top_k, s.cfg.top_p):
        sampled = ~buffer["guided"]  # guided responses were not sampled: nothing to compare
        T = old_lp.shape[1]
        diff = float(((buffer["sampled_logp"][sampled, :T] - old_lp[sampled]).abs() * mask[sampled]).max())
        metrics["check/rollout_logprob_max_diff"] = diff
        compared = f"rollout log-probs equal the training pass's to {diff:.2g}"
    else:
        compared = "rollout log-probs not compared (top-k / top-p sampling)"
    if s.start == 0:
        # The first minibatch's pi_old is its own training pass (ratio exactly 1); first_ratio_dev is how far
        # the stored pass (step 3) sits from it: the numerics later minibatches' ratios carry.
        print_main(s.job.engine.dist.is_main, f"check: before any update the stored log-probs match the training "
                   f"pass's to {metrics['check/first_ratio_dev']:.2g} (mean |ratio - 1|) and the approximate KL is "
                   f"{metrics['check/first_approxkl']:.2g}; {compared}")


def run(recipe: PPORecipe, resume: bool = False, overwrite: bool = False) -> dict:
    s = setup(recipe, resume, overwrite)
    cfg, job, engine = recipe.ppo, s.job, s.job.engine
    kl_in, kl_name = kl_placement(cfg)
    correction = rollout_correction(cfg, recipe.train.precision)
    pad_id, episodes = s.tokenizer.pad_token_id, cfg.prompts_per_rollout * cfg.samples_per_prompt
    progress = loop.make_progress(job, s.iterations, s.start, cfg.advantage)
    health = Health(cfg, cfg.samples_per_prompt)
    metrics: dict = {}
    for iteration in range(s.start + 1, s.iterations + 1):
        loop.debug_fault(iteration, engine.dist.rank)
        clock = loop.Clock()
        # Step 1. Rollout: this rank's prompts, K samples each, one seed per episode (+ guidance).
        sampled = sample(s, iteration, recipe.seed)
        if cfg.guidance == "reference":
            guide(s, sampled)
        clock.lap("rollout")
        # Step 2. Scores of every source, weighted; dynamic sampling keeps the informative groups.
        scores, per_source, sampled_stats = score(s, sampled)
        clock.lap("scoring")
        # Step 3. Log-probs of the actor as it sampled and of the reference, the critic's values; gathered.
        buffer = logprobs(s, sampled, scores, per_source)
        mask = episode_batch(buffer["prompt_ids"], buffer["response_ids"], pad_id)["response_mask"]
        clock.lap("logprobs")
        # Step 4. KL-shaped rewards.
        T = mask.shape[1]
        old_lp, ref_lp, vals = (buffer[k][:, :T] for k in ("old_logp", "ref_logp", "values"))
        beta = s.kl_ctl.value
        rewards, seq_kl = kl_shaped_rewards(buffer["scores"], old_lp, ref_lp, mask, kl_name, beta, kl_in == "reward")
        # Step 5. Advantages and returns; importance weights where the rollout's numerics are not the training's.
        advantages, returns = advantages_and_returns(cfg, buffer, rewards, vals, mask, seq_kl, beta)
        rollout_lp = rollout_logprobs(buffer, T)
        # Step 6. Epochs of minibatch updates of the actor (and the critic) through the engine.
        update = {"old_logp": old_lp, "ref_logp": ref_lp, "advantages": advantages, "values": vals,
                  "returns": returns if returns is not None else torch.zeros_like(advantages)}
        if correction:
            update["rollout_logp"] = rollout_lp
        stats = train_on_rollout(engine, cfg, s.actor, s.critic, buffer, update, mask, pad_id, iteration, beta,
                                 recipe.seed, correction)
        clock.lap("update")
        # Step 7. Log (and adapt the KL coefficient).
        s.kl_ctl.update(float(seq_kl.mean()), episodes)
        checks = {"train/lr": stats.pop("lr"), "check/first_ratio_dev": stats.pop("first_ratio_dev"),
                  "check/first_approxkl": stats.pop("first_approxkl")}
        metrics = {**iteration_metrics(buffer, mask, seq_kl, beta, stats, vals, returns, clock, episodes), **checks,
                   **mismatch_stats(old_lp, rollout_lp, mask)}
        if correction:  # the weights as the stored pass gives them (the first minibatch's come from its own)
            w = truncated_importance_weights(old_lp, rollout_lp, mask, correction,
                                             cfg.rollout_correction_cap)[mask > 0]
            metrics.update({"mismatch/is_weight_mean": float(w.mean()),
                            "mismatch/is_capped_share": float((w >= cfg.rollout_correction_cap).float().mean())})
        sums = engine.dist.reduce_sums(sampled_stats)  # one collective
        metrics["rollout/informative_share"] = sums["informative"] / engine.dist.world_size
        metrics["rollout/scores_all_sampled"] = sums["sum"] / max(sums["n"], 1.0)
        if iteration == s.start + 1:
            first_iteration_check(s, buffer, old_lp, mask, metrics)
        if (cfg.gold_eval.prompts and cfg.gold_eval.interval and iteration % cfg.gold_eval.interval == 0
                and iteration < s.iterations):  # the last one is the export's
            metrics["gold/score"] = gold_during_training(engine, s.actor, s.tokenizer, cfg.gold_eval, iteration)
        for message in health.check(metrics, buffer["groups"], cfg.kl_target):
            print_main(engine.dist.is_main, f"warning: iteration {iteration}: {message}")
        job.logger.log(metrics, iteration)
        progress.update(int(mask.sum()), score=metrics["objective/scores"], kl=metrics["objective/kl"])
        models = {"policy": s.actor, **({"critic": s.critic} if s.critic is not None else {})}
        loop.step_boundary(job, models, iteration, s.iterations, 0, s.order, extra={"kl_coef": s.kl_ctl.value})
    progress.close()
    # Export: the policy to final/ (verified), the critic to final/critic/; its gold score; the manifest.
    also = ((s.critic, "critic", "reward", s.critic_path),) if s.critic is not None else ()
    tail.finish(job, s.actor, s.tokenizer, kind="causal_lm", base_path=s.model_path, step=s.iterations,
                metrics=metrics, gold=s.gold, also=also)
    return {"metrics": metrics, "gold": s.gold.as_dict(), "data": [s.report.as_dict()]}
