"""Every stage's recipe schema in one place: the sections only one stage reads, the stage recipes, and their
cross-field checks. Loading (strict keys, types, overrides) is alignment.core.config; this module says what a
recipe of each stage may hold.

    load_recipe("configs/tiny/sft.yaml", "sft", ["train.max_steps=4"])

`RECIPES` maps a stage name (`align STAGE`) to its recipe class and `CHECKS` to its cross-field checks, which
load_recipe runs, so every mistake surfaces before any model loads (the pipeline checks every stage's recipe
before the first trains). docs/recipe-keys.md is generated from the docstrings here and in config.py.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from alignment.core.config import RecipeBase, RecipeError, build_recipe


@dataclass
class GoldEvalConfig:
    """Generate on held-out built-in task prompts and score them with the task's verifier."""

    prompts: Optional[str] = None
    """Prompt rows with `gold` specs (e.g. `builtin:prompts_eval`); `auto` = builtin:prompts_eval when data.train is
    built-in data, else none (a user's own data is not scored on the built-in task unless named); None = skip."""
    num_prompts: int = 64
    """The first N prompt rows are scored."""
    max_new_tokens: int = 32
    """Tokens generated per answer (greedy)."""
    batch_size: int = 64
    """Prompts per generation batch on a rank (greedy decoding of short answers is per-step overhead on a CPU: 128
    SmolLM2 prompts take about 20 s at 64, about 100 s at 16)."""
    samples: int = 0
    """Also score this many answers per prompt sampled at `temperature` (gold_sampled/*, by family too): the score
    sampling optimises, beside the greedy one."""
    temperature: float = 1.0
    """The sampling temperature of `samples`."""
    interval: int = 0
    """ppo: also score the policy being trained every this many iterations (its training weights, in
    memory; logged as gold/score at that iteration); 0 = only before and after."""


# ---------------------------------------------------------------------------
# sft
# ---------------------------------------------------------------------------


@dataclass
class SFTConfig:
    assistant_only_loss: bool = True
    """Loss on assistant/completion tokens only; `text` rows train on every token."""
    share_prefix: bool = False
    """Compute the tokens every example of a micro-batch starts with (a chat template's system prompt) once a row:
    the micro-batch becomes rows of up to 512 tokens with a block mask (alignment.data.layout.collate_shared_prefix). Same loss and
    gradients; fewer tokens through the model. Needs eager or sdpa attention (a 4D mask)."""
    gold_eval: GoldEvalConfig = field(default_factory=GoldEvalConfig)


@dataclass
class SFTRecipe(RecipeBase):
    sft: SFTConfig = field(default_factory=SFTConfig)


def validate_sft(recipe: SFTRecipe) -> None:
    attention = recipe.model.attn_implementation
    if recipe.sft.share_prefix and attention not in (None, "eager", "sdpa"):
        raise RecipeError(f"sft.share_prefix needs model.attn_implementation eager, sdpa or unset, got {attention!r}")


# ---------------------------------------------------------------------------
# rm
# ---------------------------------------------------------------------------


@dataclass
class RMConfig:
    center_coef: float = 0.0
    """Weight of the centring penalty (r_chosen + r_rejected)^2; 0 disables it (TRL: center_rewards_coefficient)."""
    use_margin: bool = True
    """Subtract a pair's margin (from `margin` or A/B scores) inside the sigmoid when the data has one."""
    max_prompt_length: Optional[int] = None
    """Prompt tokens kept (from the end) when a pair is too long; None = half of data.max_length."""
    trainable_layers: Optional[int] = None
    """Train only the head, the final norm and the top N decoder layers (None = all; ignored with LoRA)."""
    head_init_std: Optional[float] = None
    """Std of the new scalar head's init; None = the model's initializer_range."""
    disable_dropout: bool = True
    """Train without dropout (TRL's default), so the model trained is the one evaluated and exported."""
    share_prompt: bool = True
    """With data.packing: a pair is one packed segment [prompt | chosen | rejected], its prompt run once
    (alignment.data.layout.collate_pairs); false packs the two sequences separately. No effect unpacked."""


@dataclass
class RMRecipe(RecipeBase):
    rm: RMConfig = field(default_factory=RMConfig)


def validate_rm(recipe: RMRecipe) -> None:
    """The rm section's cross-field checks (run by load_recipe)."""
    if recipe.rm.max_prompt_length is not None and not 0 < recipe.rm.max_prompt_length < recipe.data.max_length:
        raise RecipeError("rm.max_prompt_length must be between 1 and data.max_length - 1")
    if recipe.rm.head_init_std is not None and recipe.rm.head_init_std <= 0:
        raise RecipeError("rm.head_init_std must be > 0")


# ---------------------------------------------------------------------------
# dpo
# ---------------------------------------------------------------------------


@dataclass
class DPOConfig:
    loss: Literal["sigmoid", "ipo", "hinge", "simpo"] = "sigmoid"
    """sigmoid = DPO (with label_smoothing > 0: conservative DPO); ipo; hinge (SLiC); simpo (no reference)."""
    beta: float = 0.1
    """Strength of the KL anchor to the reference (DPO eq. 7's beta); larger keeps the policy closer."""
    label_smoothing: float = 0.0
    """cDPO: assumed probability that a preference label is flipped (sigmoid loss only)."""
    simpo_gamma: float = 0.5
    """SimPO target reward margin gamma."""
    rpo_alpha: Optional[float] = None
    """Add alpha x the mean NLL of chosen tokens (RPO). None disables it."""
    reference: Literal["auto", "model", "precomputed", "adapter"] = "auto"
    """auto = adapter with LoRA, else model."""
    reference_model: Optional[str] = None
    """Reference weights; None = the policy's initial weights (model.name_or_path)."""
    max_prompt_length: Optional[int] = None
    """Prompt tokens kept (from the end) when a pair is too long; None = half of data.max_length."""
    share_prefix: bool = False
    """Rows of up to 512 tokens: the prompts' common prefix (a chat template's system prompt) runs once a row and each
    pair's prompt once for both responses (alignment.data.layout.shared_pairs_rows); same log-probs as padded rows,
    a third of the tokens on the built-in task. Needs eager or sdpa attention; not with data.packing."""
    disable_dropout: bool = True
    """Train without dropout (TRL's default): the adapter-off reference is then exact, and the step-1 check holds."""
    logp_drop_warning: float = 0.5
    """Warn when the chosen log-prob per token has fallen this many nats below its start while margins rise."""
    gold_eval: GoldEvalConfig = field(default_factory=GoldEvalConfig)


@dataclass
class DPORecipe(RecipeBase):
    dpo: DPOConfig = field(default_factory=DPOConfig)


def validate_dpo(recipe: DPORecipe) -> str:
    """Cross-field checks; returns the resolved reference mode ("none" for SimPO)."""
    cfg = recipe.dpo
    if cfg.max_prompt_length is not None and not 0 < cfg.max_prompt_length < recipe.data.max_length:
        raise RecipeError("dpo.max_prompt_length must be between 1 and data.max_length - 1")
    if cfg.beta <= 0:
        raise RecipeError("dpo.beta must be > 0")
    if not 0.0 <= cfg.label_smoothing < 0.5:
        raise RecipeError("dpo.label_smoothing must be in [0, 0.5)")
    if cfg.label_smoothing and cfg.loss != "sigmoid":
        raise RecipeError("dpo.label_smoothing applies to dpo.loss: sigmoid only")
    if cfg.loss == "simpo":
        if cfg.reference not in ("auto",) or cfg.reference_model:
            raise RecipeError("dpo.loss: simpo is reference-free; leave dpo.reference and dpo.reference_model unset")
        return "none"
    attention = recipe.model.attn_implementation
    if cfg.share_prefix and attention not in (None, "eager", "sdpa"):
        raise RecipeError(f"dpo.share_prefix needs model.attn_implementation eager, sdpa or unset, got {attention!r}")
    if cfg.share_prefix and recipe.data.packing:
        raise RecipeError("set data.packing or dpo.share_prefix, not both (both lay out a micro-batch's rows)")
    mode = cfg.reference
    if mode == "auto":
        mode = "adapter" if recipe.lora.enabled and not cfg.reference_model else "model"
    if mode == "adapter" and not recipe.lora.enabled:
        raise RecipeError("dpo.reference: adapter needs lora.enabled: true")
    if mode == "adapter" and cfg.reference_model:
        raise RecipeError("dpo.reference: adapter uses the policy's own base weights; drop dpo.reference_model")
    return mode


# ---------------------------------------------------------------------------
# kto
# ---------------------------------------------------------------------------


@dataclass
class KTOConfig:
    beta: float = 0.1
    """Strength of the anchor to the reference: beta in the KTO loss (Ethayarajh et al. 2024, eq. 8)."""
    desirable_weight: float = 1.0
    """lambda_D, the weight of a good answer's loss; with more good answers than bad ones, lower it (the paper's
    eq. 9 bound: lambda_D n_D / (lambda_U n_U) in [1, 4/3])."""
    undesirable_weight: float = 1.0
    """lambda_U, the weight of a bad answer's loss."""
    reference: Literal["auto", "model", "adapter"] = "auto"
    """auto = adapter with LoRA (the policy with its adapter off), else a frozen copy of the starting model."""
    max_prompt_length: Optional[int] = None
    """Prompt tokens kept (from the end) when prompt + answer is too long; None = half of data.max_length."""
    disable_dropout: bool = True
    """Train without dropout, so that the reference point and the rewards are read from the same model."""
    gold_eval: GoldEvalConfig = field(default_factory=GoldEvalConfig)


@dataclass
class KTORecipe(RecipeBase):
    kto: KTOConfig = field(default_factory=KTOConfig)


def validate_kto(recipe: KTORecipe) -> str:
    """Cross-field checks; returns the resolved reference mode."""
    cfg = recipe.kto
    if cfg.beta <= 0 or cfg.desirable_weight <= 0 or cfg.undesirable_weight <= 0:
        raise RecipeError("kto.beta, kto.desirable_weight and kto.undesirable_weight must be > 0")
    if cfg.max_prompt_length is not None and not 0 < cfg.max_prompt_length < recipe.data.max_length:
        raise RecipeError("kto.max_prompt_length must be between 1 and data.max_length - 1")
    if recipe.train.micro_batch_size < 2:
        raise RecipeError("KTO estimates its reference point from the other answers of a micro-batch: "
                          "train.micro_batch_size must be >= 2")
    mode = cfg.reference
    if mode == "auto":
        mode = "adapter" if recipe.lora.enabled else "model"
    if mode == "adapter" and not recipe.lora.enabled:
        raise RecipeError("kto.reference: adapter needs lora.enabled: true")
    return mode


# ---------------------------------------------------------------------------
# ppo
# ---------------------------------------------------------------------------


@dataclass
class RewardSource:
    source: str = "???"
    """`gold` (the built-in task's verifier; prompts need a `gold` spec), a reward model directory (what
    `align rm` exports), or `module:function` called as function(prompts, responses, rows) -> list of floats."""
    weight: float = 1.0
    """Multiplies this source's score in the weighted sum."""
    normalize: bool = False
    """Reward models: (r - reward_mean) / reward_std with the statistics stored at export (an error if absent)."""


@dataclass
class PPOConfig:
    advantage: Literal["gae", "grpo", "rloo", "reinforce_pp"] = "gae"
    """gae: PPO with a critic; grpo: group-normalised outcome; rloo: leave-one-out; reinforce_pp: REINFORCE++."""
    rewards: list[RewardSource] = field(default_factory=lambda: [RewardSource("gold")])
    """Reward sources, summed with their weights (ppo.rewards[] keys below)."""
    prompts_per_rollout: int = 8
    """Prompts per iteration across all ranks (a multiple of the world size: each rank samples whole groups)."""
    samples_per_prompt: int = 4
    """Responses sampled per prompt (the group of GRPO and RLOO)."""
    max_new_tokens: int = 32
    """Tokens a response may have; a response cut here did not stop (see missing_eos_penalty)."""
    temperature: float = 1.0
    """Sampling temperature of the rollout."""
    top_k: int = 0
    """Top-k sampling (0: off)."""
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
    """Weight beta of the KL penalty to the reference (the start, with kl_target)."""
    kl_estimator: Optional[Literal["k1", "k2", "k3"]] = None
    """None: k3 when the KL is in the loss, k1 when it is in the reward."""
    kl_in: Optional[Literal["reward", "loss"]] = None
    """Where the KL penalty goes; None: the loss for grpo, the reward otherwise."""
    kl_target: Optional[float] = None
    """Adapt kl_coef towards this mean per-response KL (Ziegler et al. 2019); None keeps it fixed."""
    kl_horizon: int = 10000
    """kl_target's controller: episodes over which the coefficient adapts (Ziegler et al. 2019)."""
    clip_low: float = 0.2
    """Lower clip of the importance ratio, 1 - clip_low (PPO's epsilon)."""
    clip_high: float = 0.2
    """Separate upper clip (DAPO's clip-higher, e.g. 0.28)."""
    dual_clip: Optional[float] = None
    """Bound on the loss of negative-advantage tokens, c > 1 (e.g. 3)."""
    value_clip: Optional[float] = 0.2
    """Clip of the critic's new values around its old ones (None: no clip)."""
    vf_coef: float = 0.1
    """Weight of the critic's loss."""
    gamma: float = 1.0
    """Discount of GAE and of REINFORCE++ returns."""
    lam: float = 0.95
    """GAE's lambda."""
    loss_aggregation: Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean",
                              "seq_mean_token_sum_norm"] = "token_mean"
    """How token losses make a minibatch's loss: a mean over all tokens, or per sequence then over sequences (sum
    or mean of its tokens; _norm: the sum over max_new_tokens, Dr. GRPO)."""
    whiten_advantages: bool = True
    """gae, reinforce_pp: whiten advantages over the whole rollout."""
    grpo_scale: bool = True
    """grpo: divide by the group's std (false: Dr. GRPO)."""
    score_clip: Optional[float] = None
    """Clip the total score to [-c, c]."""
    missing_eos_penalty: Optional[float] = None
    """Subtract this from the score of a response that did not stop by itself."""
    entropy_coef: float = 0.0
    """Weight of an entropy bonus (0: none)."""
    critic: Optional[str] = None
    """gae's critic initialisation: None = the first reward model among ppo.rewards, else the policy with a new head."""
    critic_learning_rate: Optional[float] = None
    """None: train.learning_rate."""
    disable_dropout: bool = True
    """Train without dropout, so that the policy sampled is the policy trained."""
    share_prompt: bool = True
    """Run each group's prompt once in the training pass, [prompt | response 1 | ... | response K] with each
    response seeing only the prompt and itself (alignment.data.layout.group_batch; the same log-probs as
    separate rows). Needs train.global_batch_size and micro_batch_size to be multiples of samples_per_prompt."""
    guidance: Optional[Literal["reference"]] = None
    """reference: in a group whose samples all fall short of the verifier's full credit, the last sample is
    replaced by the prompt's reference answer (its `gold` spec), scored by ppo.rewards like any response:
    off-policy guidance (LUFFY, Yan et al. 2025, arXiv:2504.14945, without its policy shaping; the guided
    response's old log-probs are the current policy's, so its ratio starts at 1). The group then holds the
    right answer to move towards. rollout/guided_share counts them; objective/scores leaves them out."""
    rollout_correction: Literal["auto", "none", "token", "sequence"] = "auto"
    """Truncated importance sampling for the rollout's numerics (alignment.rlhf.importance): each token's
    policy-gradient loss weighted by min(pi_old / pi_rollout, rollout_correction_cap), per token or per sequence;
    auto = token where training runs in bf16 or fp16 (there the rollout's log-probs and the training pass's differ
    by up to tenths of a nat), none in fp32. The gap is logged every iteration (mismatch/*)."""
    rollout_correction_cap: float = 2.0
    """The cap C of the importance weights."""
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
    if cfg.rollout_correction in ("token", "sequence") and (cfg.top_k or cfg.top_p < 1.0):
        problems.append("ppo.rollout_correction compares with the distribution sampled, which top-k / top-p "
                        "truncate: set it to none, or sample without top_k / top_p")
    if cfg.rollout_correction_cap <= 0:
        problems.append("ppo.rollout_correction_cap must be > 0")
    if cfg.kl_coef < 0 or (cfg.kl_target is not None and cfg.kl_target <= 0):
        problems.append("ppo.kl_coef must be >= 0 and ppo.kl_target > 0")
    for i, source in enumerate(cfg.rewards):
        if source.source == "gold" or Path(source.source).expanduser().exists():
            continue
        if ":" not in source.source:
            problems.append(f"ppo.rewards[{i}].source: {source.source!r} is neither gold, module:function nor a "
                            "reward model directory that exists")
            continue
        problem = reward_function_problem(source.source)
        if problem:
            problems.append(f"ppo.rewards[{i}].source: {problem}")
    if problems:
        raise RecipeError("; ".join(problems))


def reward_function_problem(spec: str) -> str | None:
    """Why a `module:function` reward cannot be called (its module does not import, it has no such function), or
    None; checked when the recipe loads, before any model does."""
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name, None)
    except Exception as exc:  # the user's module: any error importing it is theirs to see
        return f"{spec!r}: module {module!r} does not import ({type(exc).__name__}: {exc})"
    if not callable(fn):
        return f"{spec!r}: module {module!r} has no function {name!r}"
    return None


def rollout_correction(cfg: PPOConfig, precision: str) -> str | None:
    """ppo.rollout_correction resolved: 'token', 'sequence' or None."""
    if cfg.rollout_correction == "auto":
        return "token" if precision in ("bf16", "bf16-mixed", "fp16") and not cfg.top_k and cfg.top_p >= 1.0 else None
    return None if cfg.rollout_correction == "none" else cfg.rollout_correction


def kl_placement(cfg: PPOConfig) -> tuple[str, str]:
    """(kl_in, kl_estimator) after the per-estimator defaults."""
    kl_in = cfg.kl_in or ("loss" if cfg.advantage == "grpo" else "reward")
    return kl_in, cfg.kl_estimator or ("k3" if kl_in == "loss" else "k1")


# ---------------------------------------------------------------------------
# pipeline
# ---------------------------------------------------------------------------


@dataclass
class PipelineStage:
    recipe: str = "???"
    """Path of the stage's own recipe."""
    overrides: list[str] = field(default_factory=list)
    """Dotted overrides for that recipe, as with --set."""
    enabled: bool = True
    """Run this stage."""


@dataclass
class PairsStage:
    """On-policy pairs from the SFT policy (`align pairs`), used as DPO's training data."""
    enabled: bool = False
    """Sample on-policy pairs from the SFT policy and train DPO on them instead of the offline pairs."""
    prompts: str = "builtin:prompts_train"
    """Prompt rows to sample for."""
    judge: str = "gold"
    """'gold' (the built-in task's verifier) or 'rm' (this pipeline's reward model)."""
    chosen: Literal["best", "reference"] = "best"
    """'best': the best sample against the worst; 'reference': the verifier's reference answer against
    the worst sample when it is wrong (SPIN-style; needs judge 'gold')."""
    num_prompts: int = 256
    """Prompts per round."""
    samples: int = 4
    """Samples per prompt."""
    temperature: float = 1.0
    """Sampling temperature."""
    max_new_tokens: int = 24
    """Tokens per sample."""
    rounds: int = 1
    """Online (iterative) DPO: each round samples pairs from the policy the previous round trained and runs
    DPO from it, so the reference (the round's starting policy) moves with it. Rounds before the last go
    to pairs-round<k>/ and dpo-round<k>/; the last is pairs/ and dpo/."""


@dataclass
class RLStage(PipelineStage):
    """Online RL (`align ppo`: PPO, GRPO, ...) from the pipeline's DPO or SFT policy."""
    recipe: str = "configs/smollm2/grpo.yaml"
    """The online-RL stage's recipe (relative to the pipeline file, or to the working directory)."""
    enabled: bool = False
    """Run the online-RL stage."""
    start_from: Literal["dpo", "sft"] = "dpo"
    """The policy it starts from: the DPO export or the SFT export."""
    reward: Optional[Literal["gold", "rm", "gold+rm"]] = None
    """The reward: the built-in verifier, this pipeline's reward model (normalised with its statistics), or
    both; None keeps the stage recipe's ppo.rewards."""


@dataclass
class PipelineRecipe:
    output_dir: str = "???"
    """Every stage writes under it (sft/, rm/, dpo/, ppo/), and the pipeline its summary.json, pipeline.json and
    report.html."""
    seed: int = 0
    """The seed of every stage."""
    nproc: int = 1
    """Local ranks for every stage."""
    sft: PipelineStage = field(default_factory=PipelineStage)
    rm: PipelineStage = field(default_factory=PipelineStage)
    pairs: PairsStage = field(default_factory=PairsStage)
    dpo: PipelineStage = field(default_factory=PipelineStage)
    ppo: RLStage = field(default_factory=RLStage)

    def validate(self) -> None:
        if self.pairs.enabled and self.pairs.judge not in ("gold", "rm"):
            raise ValueError(f"pairs.judge must be 'gold' or 'rm', got {self.pairs.judge!r}")
        if self.pairs.enabled and self.pairs.judge == "rm" and not self.rm.enabled:
            raise ValueError("pairs.judge 'rm' needs the rm stage enabled")
        if self.pairs.enabled and not (self.sft.enabled and self.dpo.enabled):
            raise ValueError("the pairs stage samples from the SFT policy for DPO: enable sft and dpo")
        if self.pairs.enabled and self.pairs.chosen == "reference" and self.pairs.judge != "gold":
            raise ValueError("pairs.chosen 'reference' ranks the samples with the verifier: set pairs.judge 'gold'")
        if self.pairs.enabled and self.pairs.samples < (2 if self.pairs.chosen == "best" else 1):
            raise ValueError("pairs.samples must be at least 2 (1 with pairs.chosen 'reference')")
        if self.pairs.rounds < 1 or (self.pairs.rounds > 1 and not self.pairs.enabled):
            raise ValueError("pairs.rounds must be >= 1, and more than one round needs pairs.enabled")
        if self.ppo.enabled and self.ppo.reward in ("rm", "gold+rm") and not self.rm.enabled:
            raise ValueError(f"ppo.reward {self.ppo.reward!r} needs the rm stage enabled")
        if self.ppo.enabled and not (self.sft.enabled or self.dpo.enabled):
            raise ValueError("the ppo stage starts from the SFT or the DPO policy: enable one of them")

    def find_stage_recipes(self, here: Path) -> None:
        """Stage recipe paths are relative to the pipeline file (`here`), so it runs from any directory; one that
        is not found there but is relative to the working directory is taken from there."""
        for name in ("sft", "rm", "dpo", "ppo"):
            stage = getattr(self, name)
            path = Path(stage.recipe).expanduser()
            if path.is_absolute() or not stage.enabled:
                continue
            if (here / path).is_file():
                stage.recipe = str(here / path)
            elif not path.is_file():
                raise RecipeError(f"{name}.recipe: {stage.recipe} is neither beside the pipeline file ({here / path}) "
                                  f"nor relative to the working directory ({Path.cwd() / path})")


# ---------------------------------------------------------------------------
# The registry and loading
# ---------------------------------------------------------------------------

RECIPES: dict[str, type] = {"sft": SFTRecipe, "rm": RMRecipe, "dpo": DPORecipe, "kto": KTORecipe,
                            "ppo": PPORecipe, "pipeline": PipelineRecipe}
CHECKS: dict[str, Callable[[Any], Any]] = {"sft": validate_sft, "rm": validate_rm, "dpo": validate_dpo,
                                           "kto": validate_kto, "ppo": validate_ppo}


def resolve_auto_sources(recipe: RecipeBase, stage: str) -> None:
    """`data.eval: auto` and `gold_eval.prompts: auto` as the recipe's own training data makes them: built-in train
    data is evaluated on its built-in eval set and scored on the built-in task's prompts; a user's own data on a
    held-out split of itself, and not on the built-in task. Online RL reads prompts only: no held-out split."""
    d = recipe.data
    builtin = d.train.startswith("builtin:")
    if d.eval == "auto":
        d.eval = None
        if stage != "ppo" and builtin and d.train.endswith("_train"):
            d.eval = d.train[: -len("_train")] + "_eval"
        elif stage != "ppo" and d.eval_fraction is None:
            d.eval_fraction = 0.1
    gold = getattr(getattr(recipe, stage, None), "gold_eval", None)
    if gold is not None and gold.prompts == "auto":
        gold.prompts = "builtin:prompts_eval" if builtin else None


def load_recipe(path: str | Path | None, stage: str, overrides: list[str] | None = None) -> Any:
    """Read, override, type-check and validate a recipe for `stage` (alignment.core.config.build_recipe with the
    stage's schema and checks), its `auto` sources resolved; a pipeline's stage recipes found beside it."""
    recipe = build_recipe(path, RECIPES[stage], overrides, CHECKS.get(stage))
    if isinstance(recipe, RecipeBase):
        resolve_auto_sources(recipe, stage)
    elif isinstance(recipe, PipelineRecipe):
        recipe.find_stage_recipes(Path(path).parent if path is not None else Path.cwd())
    return recipe
