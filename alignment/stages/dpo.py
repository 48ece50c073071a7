"""Direct preference optimisation and its family (DPO, cDPO, IPO, hinge, SimPO, RPO term).

    align dpo configs/tiny/dpo.yaml [--set dpo.loss=ipo] [--nproc 2] [--resume]

The policy learns from preference pairs against a frozen reference, which is one of:
- ``model``: a frozen copy (sharded under ZeRO-3 like the policy, no optimizer state);
- ``precomputed``: reference log-probs computed in one pass before training and cached
  on disk under a key of model weights, tokenized data and lengths (a mismatching cache
  is recomputed, never reused);
- ``adapter``: with LoRA, the policy with its adapter switched off (no second model).
SimPO needs no reference. Chosen and rejected run through the policy in one [2B, T]
forward, and log-probs are computed only at response tokens.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from alignment.core import loop
from alignment.core.fingerprint import model_fingerprint, sequence_fingerprint
from alignment.core.modeling import sequence_logprobs, user_model
from alignment.core.models import cache_dir, count_parameters, load_model, load_tokenizer, resolve_model_path
from alignment.core.recipes import DPOConfig, DPORecipe, validate_dpo
from alignment.core.tracking import print_main
from alignment.data.layout import collate_pairs
from alignment.data.preference import load_pairs
from alignment.data.report import DataReport
from alignment.data.sampler import GlobalBatchSampler
from alignment.data.sources import read_splits
from alignment.rlhf.dpo_losses import dpo_sigmoid_loss, hinge_loss, implicit_rewards, ipo_loss, simpo_loss
from alignment.stages import tail

LN2 = math.log(2.0)


# ---------------------------------------------------------------------------
# Log-probs and the reference
# ---------------------------------------------------------------------------


def pair_logps(model, batch: dict) -> tuple[torch.Tensor, ...]:
    """(chosen, rejected, chosen_len, rejected_len), each [B], from one forward over [2B, T]."""
    total, count = sequence_logprobs(model, batch)
    half = total.shape[0] // 2
    return total[:half], total[half:], count[:half], count[half:]


class Reference:
    """Reference log-probs for a batch of pairs, whichever way the reference is provided."""

    def __init__(self, mode: str, engine=None, frozen=None, table: dict[str, torch.Tensor] | None = None):
        self.mode, self.engine, self.frozen, self.table = mode, engine, frozen, table

    @torch.no_grad()
    def logps(self, policy, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "none":
            zeros = torch.zeros(batch["index"].shape[0], device=batch["index"].device)
            return zeros, zeros
        if self.mode == "precomputed":
            key = "eval" if batch.get("split") == "eval" else "train"
            idx = batch["index"].cpu()
            return self.table[key][idx, 0].to(batch["index"].device), self.table[key][idx, 1].to(batch["index"].device)
        if self.mode == "adapter":
            with user_model(policy).disable_adapter():
                chosen, rejected, _, _ = pair_logps(policy, batch)
            return chosen, rejected
        chosen, rejected, _, _ = pair_logps(self.frozen, batch)
        return chosen, rejected


def pairs_fingerprint(pairs: list) -> str:
    return sequence_fingerprint((p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs)


@torch.no_grad()
def compute_reference_table(engine, frozen, pairs: list, pad_id: int, split: str,
                            pack_to: int | None = None) -> torch.Tensor:
    """[N, 2] reference log-probs (chosen, rejected) for every pair, computed in lock-step over ranks."""
    micro, world = engine.layout.micro_batch_size, engine.dist.world_size
    local = []
    for b in range(math.ceil(len(pairs) / (micro * world))):
        start = (b * world + engine.dist.rank) * micro
        chunk = pairs[start : start + micro]
        batch = loop.to_device(collate_pairs(chunk or pairs[:1], pad_id, pack_to), engine.dist.device)
        chosen, rejected, _, _ = pair_logps(frozen, batch)
        local += [(start + i, chosen[i].item(), rejected[i].item()) for i in range(len(chunk))]
    rows = sorted(r for part in engine.dist.gather_objects(local) for r in part)
    assert [r[0] for r in rows] == list(range(len(pairs))), f"{split}: reference pass lost pairs"
    return torch.tensor([r[1:] for r in rows], dtype=torch.float32)


def load_reference(engine, recipe, ref_path: str):
    """The frozen reference: the policy's revision and remote-code setting unless dpo.reference_model names
    another model, and the policy's attention kernel (so step-0 log-ratios are exactly zero)."""
    own = not recipe.dpo.reference_model
    return load_model(ref_path, "causal_lm", revision=recipe.model.revision if own else None,
                      trust_remote_code=recipe.model.trust_remote_code,
                      attn_implementation=loop.attention_implementation(engine, recipe))


def read_reference_cache(path: Path, key: str, splits: dict[str, list]) -> dict | None:
    """The cached table at `path` when it is whole and was written under `key`; None otherwise.
    Plain tensors in safetensors (nothing in the file is executed)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}).get("key") != key:
                return None
            table = {name: handle.get_tensor(name) for name in splits}
    except Exception:  # absent, truncated, or not a safetensors file at all
        return None
    return table if all(table[n].shape == (len(p), 2) for n, p in splits.items()) else None


def write_reference_cache(path: Path, key: str, table: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in table.items()}, str(tmp), metadata={"key": key})
    tmp.replace(path)


def load_or_compute_reference(engine, ref_path: str, recipe, splits: dict[str, list], pad_id: int) -> dict:
    """Reference log-probs, cached under a key of model weights (a hub model pinned to its commit),
    precision, attention kernel and tokenized pairs; a model that cannot be pinned is not cached."""
    revision = None if recipe.dpo.reference_model else recipe.model.revision
    weights = model_fingerprint(ref_path, revision)
    key = hashlib.sha256(((f"{weights}|{recipe.train.precision}|{loop.attention_implementation(engine, recipe)}|"
                           f"{pair_layout(recipe)}|")
                          + "|".join(f"{name}:{pairs_fingerprint(pairs)}" for name, pairs in sorted(splits.items())))
                         .encode()).hexdigest()[:32]
    path = cache_dir() / "ref_logps" / f"{key}.safetensors" if weights else None
    table = read_reference_cache(path, key, splits) if path else None
    if table is not None:
        print_main(engine.dist.is_main, f"reference log-probs: cache hit {path}")
        return table
    where = f"cache {path}" if path else (f"not cached: {ref_path}@{revision or 'main'} is not in the local "
                                          "Hugging Face cache, so its commit cannot be pinned")
    print_main(engine.dist.is_main, f"reference log-probs: computing for {sum(map(len, splits.values()))} pairs ({where})")
    with engine.model_init(trainable=False):
        frozen = engine.prepare_frozen(load_reference(engine, recipe, ref_path))
    pack_to = pair_layout(recipe)
    table = {name: compute_reference_table(engine, frozen, pairs, pad_id, name, pack_to) for name, pairs in splits.items()}
    del frozen
    if engine.dist.is_main and path:
        write_reference_cache(path, key, table)
    engine.dist.barrier()
    return table


# ---------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------


def preference_losses(cfg: DPOConfig, pc, pr, rc, rr, lc, lr) -> torch.Tensor:
    """Per-pair loss [B] for the configured variant."""
    if cfg.loss == "sigmoid":
        return dpo_sigmoid_loss(pc, pr, rc, rr, cfg.beta, cfg.label_smoothing)
    if cfg.loss == "ipo":
        return ipo_loss(pc, pr, rc, rr, cfg.beta, lc, lr)
    if cfg.loss == "hinge":
        return hinge_loss(pc, pr, rc, rr, cfg.beta)
    return simpo_loss(pc, pr, lc, lr, cfg.beta, cfg.simpo_gamma)


def make_loss_fn(cfg: DPOConfig, reference: Reference):
    """Micro-batch loss: sum over pairs of the variant's loss (+ RPO term), with metric sums.

    The RPO term is alpha x (chosen NLL summed) / (chosen tokens of the whole batch it belongs to):
    batch["rpo_scale"] = pairs / chosen tokens of that batch (the global training batch, or the whole
    eval set) turns it into a per-pair sum, so a mean over pairs is alpha x the NLL per chosen token.
    """

    def fn(model, batch):
        pc, pr, lc, lr = pair_logps(model, batch)
        rc, rr = reference.logps(model, batch)
        losses = preference_losses(cfg, pc, pr, rc, rr, lc, lr)
        loss_sum = losses.sum()
        if cfg.rpo_alpha:
            loss_sum = loss_sum + cfg.rpo_alpha * (-pc.sum()) * batch["rpo_scale"]
        beta = cfg.beta
        if cfg.loss == "simpo":  # SimPO's reward is length-normalised and reference-free
            reward_c, reward_r = beta * pc.detach() / lc.clamp(min=1), beta * pr.detach() / lr.clamp(min=1)
        else:
            reward_c, reward_r = implicit_rewards(pc.detach(), pr.detach(), rc, rr, beta)
        return loss_sum, {
            "loss": loss_sum.detach().item(),
            "pref_loss": losses.detach().sum().item(),
            "reward_chosen": reward_c.sum().item(),
            "reward_rejected": reward_r.sum().item(),
            "correct": (reward_c > reward_r).float().sum().item(),
            "logp_chosen": pc.detach().sum().item(),
            "logp_rejected": pr.detach().sum().item(),
            "len_chosen": lc.sum().item(),
            "len_rejected": lr.sum().item(),
            # the pairs' sequences, the same in every layout
            "tokens": float(batch.get("sequence_tokens", batch["attention_mask"].sum())),
            "tokens_computed": float(batch["attention_mask"].sum()),
        }

    return fn


def pair_layout(recipe) -> int | str | None:
    """collate_pairs' layout: one shared row per micro-batch, padding-free packed rows, or padded rows."""
    if recipe.dpo.share_prefix:
        return "shared"
    return recipe.data.max_length if recipe.data.packing else None


def pair_batch(pairs: list, indices: list[int], pad_id: int, device, split: str = "train",
               pack_to: int | None = None) -> dict:
    batch = loop.to_device(collate_pairs([pairs[i] for i in indices], pad_id, pack_to), device)
    batch["index"] = torch.tensor(indices, device=device)
    batch["split"] = split
    return batch


def summarize(sums: dict, prefix: str = "") -> dict:
    n = sums["count"]
    return {
        f"{prefix}loss": sums["loss"] / n,
        f"{prefix}rewards/chosen": sums["reward_chosen"] / n,
        f"{prefix}rewards/rejected": sums["reward_rejected"] / n,
        f"{prefix}rewards/margins": (sums["reward_chosen"] - sums["reward_rejected"]) / n,
        f"{prefix}rewards/accuracies": sums["correct"] / n,
        f"{prefix}logps/chosen": sums["logp_chosen"] / n,
        f"{prefix}logps/rejected": sums["logp_rejected"] / n,
        f"{prefix}logps/chosen_per_token": sums["logp_chosen"] / max(sums["len_chosen"], 1.0),
    }


class LogpDropWatch:
    """Warns once when the chosen log-prob per token falls far while margins rise (both
    responses pushed down, a known DPO failure: Pal et al. 2024, "Smaug", arXiv:2402.13228).

    Compares like with like: the held-out pairs at each eval against the same pairs at
    step 0 when there is an eval split, otherwise the mean of the last `window` train
    batches against the first `window` (one batch against another is mostly noise).
    """

    def __init__(self, threshold: float, window: int = 5):
        self.threshold, self.window = threshold, window
        self.eval_baseline: float | None = None
        self.train_values: list[float] = []
        self.warned = False

    def update(self, metrics: dict, advice: str) -> str | None:
        if self.warned:
            return None
        if self.eval_baseline is not None:
            if "eval/logps/chosen_per_token" not in metrics:
                return None
            before, now = self.eval_baseline, metrics["eval/logps/chosen_per_token"]
            margin, where = metrics["eval/rewards/margins"], "held-out "
        else:
            self.train_values.append(metrics["logps/chosen_per_token"])
            if len(self.train_values) < 2 * self.window:
                return None
            before = sum(self.train_values[: self.window]) / self.window
            now = sum(self.train_values[-self.window :]) / self.window
            margin, where = metrics["rewards/margins"], f"mean of {self.window} batches: "
        if margin > 0 and now < before - self.threshold:
            self.warned = True
            return (f"{where}chosen log-prob per token fell from {before:.3f} to {now:.3f} while margins rise; "
                    f"both responses are being pushed down (consider {advice})")
        return None


def rpo_scale(pairs: list) -> float:
    """Pairs per chosen token of a batch of pairs (make_loss_fn's RPO normaliser)."""
    return len(pairs) / max(1, sum(len(p.chosen_ids) for p in pairs))


@torch.no_grad()  # no graph: held-out forwards would otherwise keep training-sized activations alive
def evaluate(engine, model, pairs: list, pad_id: int, loss_fn, pack_to: int | None = None) -> dict[str, float]:
    """Held-out DPO metrics over every pair, sharded over ranks in lock-step; the RPO term normalised over
    the whole eval set, so eval/loss is the same quantity at every evaluation."""
    micro, world = engine.layout.micro_batch_size, engine.dist.world_size
    scale = rpo_scale(pairs)
    model.eval()
    sums: dict[str, float] = {}
    for b in range(math.ceil(len(pairs) / (micro * world))):
        start = (b * world + engine.dist.rank) * micro
        indices = list(range(start, min(start + micro, len(pairs))))
        weight = 1.0 if indices else 0.0
        batch = pair_batch(pairs, indices or [0], pad_id, engine.dist.device, "eval", pack_to)
        _, stats = loss_fn(model, dict(batch, rpo_scale=scale))
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + weight * v
        sums["pairs"] = sums.get("pairs", 0.0) + len(indices)
    model.train()
    reduced = engine.dist.reduce_sums(sums)
    reduced["count"] = max(reduced["pairs"], 1.0)
    return summarize(reduced, "eval/")


# ---------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------


def load_dpo_data(recipe: DPORecipe, tokenizer) -> tuple[list, list, list[DataReport]]:
    """Rows -> tokenized training and held-out pairs (the loaders the reward model shares), with the report."""
    rows, eval_rows = read_splits(recipe.data, recipe.seed)
    reports = [DataReport("train", rows.described), DataReport("eval", eval_rows.described)]
    cut = recipe.dpo.max_prompt_length
    train_pairs = load_pairs(rows, tokenizer, recipe.data, cut, reports[0])
    eval_pairs = load_pairs(eval_rows, tokenizer, recipe.data, cut, reports[1]) if eval_rows else []
    return train_pairs, eval_pairs, reports


def load_reference_of(engine, recipe: DPORecipe, mode: str, ref_path: str, splits: dict, pad_id: int) -> "Reference":
    """Step 3's reference: a precomputed table, a frozen model in the engine, or the policy without its adapter."""
    reference = Reference(mode, engine)
    if mode == "precomputed":
        reference.table = load_or_compute_reference(engine, ref_path, recipe, splits, pad_id)
    elif mode == "model":
        with engine.model_init(trainable=False):
            reference.frozen = engine.prepare_frozen(load_reference(engine, recipe, ref_path))
    return reference


def step1_check(engine, recipe: DPORecipe, metrics: dict) -> None:
    """Reference == policy before the first update: loss ln 2 (sigmoid), implicit rewards 0."""
    deviation = abs(metrics["rewards/chosen"]) + abs(metrics["rewards/rejected"])
    metrics["check/step1_reward_abs"] = deviation
    tolerance = 1e-4 if recipe.train.precision == "fp32" else 5e-2
    if deviation > tolerance:
        print_main(engine.dist.is_main, f"warning: at step 1 the policy and the reference disagree (|rewards| "
                   f"{deviation:.3g} > {tolerance}); the reference is not the policy's initial model")
    elif recipe.dpo.loss == "sigmoid" and not recipe.dpo.rpo_alpha:
        print_main(engine.dist.is_main, f"check: step-1 loss {metrics['loss']:.6f} (ln 2 = {LN2:.6f}), "
                   f"implicit rewards {deviation:.2g}")


def run(recipe: DPORecipe, resume: bool = False, overwrite: bool = False) -> dict:
    ref_mode = validate_dpo(recipe)  # the checks load_recipe ran, and the resolved reference mode
    cfg = recipe.dpo
    # Step 1. Engine, output directory, resolved recipe, metrics logger.
    job, checkpoint = loop.setup_run(recipe, "dpo", resume, overwrite)
    engine = job.engine

    # Step 2. Tokenizer and preference pairs, data report, the order of the examples.
    model_path = resolve_model_path(recipe.model.name_or_path, recipe.model.revision)
    tokenizer = load_tokenizer(recipe.model.tokenizer or model_path, recipe.model.trust_remote_code, recipe.model.revision)
    train_pairs, eval_pairs, reports = load_dpo_data(recipe, tokenizer)
    tail.report_data(job, reports)
    pad_id, pack_to = tokenizer.pad_token_id, pair_layout(recipe)
    sampler = GlobalBatchSampler(len(train_pairs), engine.layout, recipe.seed)
    print_main(engine.dist.is_main, sampler.describe())
    order = loop.data_order(pairs_fingerprint(train_pairs), len(train_pairs), engine, recipe.seed)
    loop.check_resume(checkpoint, order)
    steps = loop.total_steps(recipe, sampler.steps_per_epoch)

    # Step 3. Reference: precomputed table, frozen engine, or the policy without its adapter.
    ref_path = resolve_model_path(cfg.reference_model) if cfg.reference_model else model_path
    splits = {"train": train_pairs, **({"eval": eval_pairs} if eval_pairs else {})}
    reference = load_reference_of(engine, recipe, ref_mode, ref_path, splits, pad_id)

    # Step 4. Policy: loaded (sharded under ZeRO-3), LoRA, wrapped; resume; the starting model's gold score.
    policy = loop.load_trainable_model(engine, recipe, model_path, "causal_lm", disable_dropout=cfg.disable_dropout)
    trainable, total = count_parameters(policy)
    print_main(engine.dist.is_main, f"policy {recipe.model.name_or_path}: {total / 1e6:.2f}M parameters, "
               f"{trainable / 1e6:.2f}M trainable; loss {cfg.loss}, beta {cfg.beta}, reference {ref_mode}; "
               f"{steps} steps, {sampler.steps_per_epoch} per epoch")
    policy = engine.prepare(policy, steps)
    start = loop.resume(job, checkpoint, {"policy": policy})
    gold = tail.score_start(job, model_path, cfg.gold_eval, start)

    # Step 5. Train: concatenated chosen+rejected forward, variant loss, implicit-reward metrics.
    loss_fn = make_loss_fn(cfg, reference)
    progress = loop.make_progress(job, steps, start, "dpo")
    clock = loop.Clock()
    logp_watch = LogpDropWatch(cfg.logp_drop_warning)
    metrics: dict = {}
    if eval_pairs and start == 0 and recipe.train.eval_before_training:
        initial = evaluate(engine, policy, eval_pairs, pad_id, loss_fn, pack_to)
        logp_watch.eval_baseline = initial["eval/logps/chosen_per_token"]
        job.logger.log(initial, step=0)
    policy.train()
    for step in range(start + 1, steps + 1):
        loop.debug_fault(step, engine.dist.rank)
        # The RPO term is normalised over the global batch, which every rank knows from the sampler.
        scale = rpo_scale([train_pairs[i] for r in range(engine.dist.world_size)
                           for idx in sampler.micro_batches(step - 1, r) for i in idx])
        micro = [dict(pair_batch(train_pairs, idx, pad_id, engine.dist.device, "train", pack_to), rpo_scale=scale)
                 for idx in sampler.micro_batches(step - 1, engine.dist.rank)]
        sums = loop.accumulated_step(engine, policy, micro, lambda b: float(len(b["index"])), loss_fn, step)
        elapsed = clock.lap()
        metrics = {**summarize(sums), "train/lr": sums["lr"], "train/grad_norm": engine.grad_norm(policy),
                   "train/pairs_per_s": sums["count"] / max(elapsed, 1e-9),
                   "train/tokens_per_s": sums["tokens"] / max(elapsed, 1e-9),
                   "train/tokens_computed": sums["tokens_computed"],  # fewer with packing or dpo.share_prefix
                   "train/epoch": (step - 1) / sampler.steps_per_epoch}
        if step == 1 and ref_mode != "none" and ref_path == model_path:
            step1_check(engine, recipe, metrics)
        if eval_pairs and loop.eval_due(recipe, step, steps):
            metrics.update(evaluate(engine, policy, eval_pairs, pad_id, loss_fn, pack_to))
        message = logp_watch.update(metrics, advice="a larger rpo_alpha or beta" if cfg.rpo_alpha
                                    else "rpo_alpha or a larger beta")
        if message:
            print_main(engine.dist.is_main, f"warning: step {step}: {message}")
        if step % recipe.train.log_interval == 0 or step == steps or "eval/loss" in metrics:
            job.logger.log(metrics, step)
        progress.update(int(sums["tokens"]), loss=metrics["loss"], acc=metrics["rewards/accuracies"])
        loop.step_boundary(job, {"policy": policy}, step, steps, (step - 1) // sampler.steps_per_epoch, order)
    progress.close()

    # Step 6. Export final/ (reloaded in a fresh process and compared), its gold score, the manifest.
    if "eval/rewards/accuracies" in metrics:
        print_main(engine.dist.is_main, f"held-out implicit-reward accuracy {metrics['eval/rewards/accuracies']:.3f} "
                   f"on {len(eval_pairs)} pairs, margin {metrics['eval/rewards/margins']:.3f}")
    tail.finish(job, policy, tokenizer, kind="causal_lm", base_path=model_path, step=steps, gold=gold,
                metrics=metrics)
    return {"metrics": metrics, "data": [r.as_dict() for r in reports], "gold": gold.as_dict()}
