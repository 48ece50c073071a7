"""Reward-model training: Bradley-Terry on preference pairs.

    align rm configs/tiny/rm.yaml [--set ...] [--nproc 2] [--resume]

A causal-LM backbone gets a scalar head (transformers' AutoModelForSequenceClassification,
num_labels=1) and learns r(prompt, response) so that chosen responses score above
rejected ones. Chosen and rejected go through the model in one forward pass: a
right-padded [2B, T] batch, or with data.packing rows packed without padding where
(rm.share_prompt, the default) each pair's prompt runs once for both responses: on
hh-rlhf that is 35% fewer tokens than two sequences, and 55% fewer than right-padded
rows. The loss of a step is the mean per-pair loss over the whole global batch.
"""

from __future__ import annotations

import math

import torch

from alignment.core import loop
from alignment.core.fingerprint import sequence_fingerprint
from alignment.core.models import count_parameters, load_tokenizer, resolve_model_path
from alignment.core.recipes import RMRecipe
from alignment.core.tracking import print_main
from alignment.data.layout import collate_pairs
from alignment.data.preference import load_pairs
from alignment.data.report import DataReport
from alignment.data.sampler import GlobalBatchSampler
from alignment.data.sources import read_splits
from alignment.stages import tail
from reward.losses import reward_loss
from reward.metrics import reward_report
from reward.model import batch_rewards, ensure_distinct_pad, score_head

LENGTH_BIAS_WARNING = 0.5


def pair_loss(center_coef: float, use_margin: bool):
    def fn(model, batch):
        rewards = batch_rewards(model, batch)
        half = rewards.shape[0] // 2
        chosen, rejected = rewards[:half], rewards[half:]
        margin = batch["margin"] if (use_margin and batch["has_margin"]) else None
        losses = reward_loss(chosen, rejected, margin, center_coef)
        loss_sum = losses.sum()
        return loss_sum, {
            "loss": loss_sum.detach().item(),
            "correct": float((chosen > rejected).sum()),
            "margin": float((chosen - rejected).detach().sum()),
            "pairs": float(half),
            "tokens": float(batch["sequence_tokens"]),  # of chosen + rejected sequences, in every layout
        }

    return fn


def init_head(engine, model, std: float) -> None:
    """Draw the new scalar head from N(0, std^2), on rank 0, ZeRO-3 included (FAILURES row 5)."""
    head = score_head(model).weight
    with engine.modifying([head]):
        torch.nn.init.normal_(head, std=std)


def freeze_lower_layers(model, keep_top: int) -> None:
    """Freeze everything but the scalar head, the final norm and the top `keep_top` decoder layers."""
    backbone = getattr(model, model.base_model_prefix)
    layers = getattr(backbone, "layers", None) or getattr(backbone, "h", None)
    if layers is None:
        raise ValueError("rm.trainable_layers: cannot find the decoder layers of this architecture")
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in list(layers)[len(layers) - keep_top:] if keep_top else []:
        layer.requires_grad_(True)
    for name, module in backbone.named_children():
        if "norm" in name.lower():
            module.requires_grad_(True)
    for name in ("score", "classifier"):
        if hasattr(model, name):
            getattr(model, name).requires_grad_(True)


@torch.no_grad()
def evaluate(engine, model, pairs: list, pad_id: int, pack_to: int | None = None,
             share_prompt: bool = False) -> dict[str, float]:
    """Rewards for every held-out pair, in lock-step over ranks; metrics on the gathered set."""
    micro, world = engine.layout.micro_batch_size, engine.dist.world_size
    model.eval()
    local = []
    for b in range(math.ceil(len(pairs) / (micro * world))):
        start = (b * world + engine.dist.rank) * micro
        chunk = pairs[start : start + micro]
        batch = loop.to_device(collate_pairs(chunk or pairs[:1], pad_id, pack_to, share_prompt), engine.dist.device)
        rewards = batch_rewards(model, batch).cpu()
        half = rewards.shape[0] // 2
        for i, pair in enumerate(chunk):
            local.append((start + i, rewards[i].item(), rewards[half + i].item(), len(pair.chosen_ids), len(pair.rejected_ids)))
    model.train()
    rows = sorted(r for part in engine.dist.gather_objects(local) for r in part)
    t = torch.tensor([r[1:] for r in rows], dtype=torch.float64)
    return reward_report(t[:, 0], t[:, 1], t[:, 2], t[:, 3])


def reward_statistics(engine, model, metrics: dict, train_pairs: list, pad_id: int, layout: tuple,
                      max_length: int, max_prompt_length: int | None) -> dict:
    """What the export carries besides the weights: the reward's mean and std over held-out responses (else over
    training responses), and how training cut long rows, so `align score` and the PPO reward cut them the same
    way."""
    if "eval/reward_mean" in metrics:
        stats = {"reward_mean": metrics["eval/reward_mean"], "reward_std": metrics["eval/reward_std"],
                 "reward_stats_source": "held-out responses"}
    else:
        sample = evaluate(engine, model, train_pairs[:256], pad_id, *layout)
        stats = {"reward_mean": sample["eval/reward_mean"], "reward_std": sample["eval/reward_std"],
                 "reward_stats_source": "training responses (no eval split)"}
    return {**stats, "reward_max_length": max_length, "reward_max_prompt_length": max_prompt_length}


def load_rm_pairs(job: loop.Run, recipe: RMRecipe, tokenizer, rows, eval_rows):
    """Rows -> pairs as a reward model reads them (the template's suffix after each response), with the report."""
    reports = [DataReport("train", rows.described), DataReport("eval", eval_rows.described)]
    cut = recipe.rm.max_prompt_length
    train_pairs = load_pairs(rows, tokenizer, recipe.data, cut, reports[0], reward_model=True)
    eval_pairs = load_pairs(eval_rows, tokenizer, recipe.data, cut, reports[1], reward_model=True) if eval_rows else []
    tail.report_data(job, reports)
    return train_pairs, eval_pairs, reports


def run(recipe: RMRecipe, resume: bool = False, overwrite: bool = False) -> dict:
    # Step 1. Engine, output directory, resolved recipe, metrics logger.
    job, checkpoint = loop.setup_run(recipe, "rm", resume, overwrite)
    engine = job.engine

    # Step 2. Tokenizer (with a pad distinct from EOS, set in step 3) and the rows.
    model_path = resolve_model_path(recipe.model.name_or_path, recipe.model.revision)
    tokenizer = load_tokenizer(recipe.model.tokenizer or model_path, recipe.model.trust_remote_code, recipe.model.revision)
    d = recipe.data
    rows, eval_rows = read_splits(d, recipe.seed)

    # Step 3. Model: backbone + scalar head (sharded under ZeRO-3 as it loads), LoRA or partial freeze; pairs.
    def before_adapters(model):
        ensure_distinct_pad(tokenizer, model)
        if recipe.rm.head_init_std is not None:
            init_head(engine, model, recipe.rm.head_init_std)

    share_prompt = d.packing and recipe.rm.share_prompt
    # A shared-prompt segment holds prompt + both responses: up to 2 x max_length - 1 tokens.
    model = loop.load_trainable_model(engine, recipe, model_path, "reward", before_adapters,
                                      longest_row=2 * d.max_length if share_prompt else d.max_length,
                                      disable_dropout=recipe.rm.disable_dropout, block_masked=share_prompt)
    train_pairs, eval_pairs, reports = load_rm_pairs(job, recipe, tokenizer, rows, eval_rows)
    if not recipe.lora.enabled and recipe.rm.trainable_layers is not None:
        freeze_lower_layers(model, recipe.rm.trainable_layers)
    sampler = GlobalBatchSampler(len(train_pairs), engine.layout, recipe.seed)
    print_main(engine.dist.is_main, sampler.describe())
    order = loop.data_order(sequence_fingerprint((p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in train_pairs),
                            len(train_pairs), engine, recipe.seed)
    loop.check_resume(checkpoint, order)
    steps = loop.total_steps(recipe, sampler.steps_per_epoch)
    trainable, total = count_parameters(model)
    print_main(engine.dist.is_main, f"reward model {recipe.model.name_or_path}: {total / 1e6:.2f}M parameters, "
               f"{trainable / 1e6:.2f}M trainable; {steps} steps, {sampler.steps_per_epoch} per epoch")
    model = engine.prepare(model, steps)

    # Step 4. Resume.
    start = loop.resume(job, checkpoint, {"reward": model})

    # Step 5. Train.
    pad_id = tokenizer.pad_token_id
    layout = (d.max_length if d.packing else None, share_prompt)  # padding-free pair batches
    loss_fn = pair_loss(recipe.rm.center_coef, recipe.rm.use_margin)
    progress = loop.make_progress(job, steps, start, "rm")
    clock = loop.Clock()
    metrics: dict = {}
    if eval_pairs and start == 0 and recipe.train.eval_before_training:
        job.logger.log(evaluate(engine, model, eval_pairs, pad_id, *layout), step=0)
    model.train()
    for step in range(start + 1, steps + 1):
        loop.debug_fault(step, engine.dist.rank)
        micro = [loop.to_device(collate_pairs([train_pairs[i] for i in idx], pad_id, *layout), engine.dist.device)
                 for idx in sampler.micro_batches(step - 1, engine.dist.rank)]
        sums = loop.accumulated_step(engine, model, micro, lambda b: float(b["margin"].numel()), loss_fn, step)
        elapsed = clock.lap()
        metrics = {"loss": sums["loss"] / sums["count"], "rewards/accuracies": sums["correct"] / sums["count"],
                   "rewards/margins": sums["margin"] / sums["count"], "train/lr": sums["lr"],
                   "train/grad_norm": engine.grad_norm(model), "train/pairs_per_s": sums["pairs"] / max(elapsed, 1e-9),
                   "train/tokens_per_s": sums["tokens"] / max(elapsed, 1e-9),
                   "train/epoch": (step - 1) / sampler.steps_per_epoch}
        if eval_pairs and loop.eval_due(recipe, step, steps):
            metrics.update(evaluate(engine, model, eval_pairs, pad_id, *layout))
            if abs(metrics["eval/length_corr"]) > LENGTH_BIAS_WARNING:
                print_main(engine.dist.is_main, f"warning: step {step}: reward/length correlation "
                           f"{metrics['eval/length_corr']:.2f} on held-out responses (length bias)")
        if step % recipe.train.log_interval == 0 or step == steps or "eval/accuracy" in metrics:
            job.logger.log(metrics, step)
        progress.update(int(sums["tokens"]), loss=metrics["loss"], acc=metrics["rewards/accuracies"])
        loop.step_boundary(job, {"reward": model}, step, steps, (step - 1) // sampler.steps_per_epoch, order)
    progress.close()

    # Step 6. Reward statistics, export with them (reloaded in a fresh process and compared), the manifest.
    engine.release_optimizer_state(model)  # before the statistics' forward passes too
    stats = reward_statistics(engine, model, metrics, train_pairs, pad_id, layout, d.max_length,
                              recipe.rm.max_prompt_length)
    if "eval/accuracy" in metrics:
        print_main(engine.dist.is_main, f"held-out: accuracy {metrics['eval/accuracy']:.3f} on "
                   f"{int(metrics['eval/pairs'])} pairs, margin {metrics['eval/margin']:.3f}, "
                   f"ECE {metrics['eval/ece']:.3f}, length corr {metrics['eval/length_corr']:.2f}")
    tail.finish(job, model, tokenizer, kind="reward", base_path=model_path, step=steps,
                metrics={**metrics, **stats}, extra_config=stats)
    return {"metrics": metrics, "data": [r.as_dict() for r in reports], "stats": stats}
