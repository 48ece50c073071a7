"""Supervised fine-tuning: next-token cross-entropy on assistant (or completion) tokens.

    align sft configs/tiny/sft.yaml [--set train.max_steps=20] [--nproc 2] [--resume]

The loss of an optimizer step is the mean negative log-likelihood over every
supervised token of the global batch (all ranks, all micro-batches), so the
loss curve and the gradients do not depend on how the batch is split.
"""

from __future__ import annotations

import math

import torch

from alignment.core import loop
from alignment.core.fingerprint import sequence_fingerprint
from alignment.core.modeling import target_logprobs
from alignment.core.models import count_parameters, load_tokenizer, resolve_model_path
from alignment.core.recipes import SFTRecipe
from alignment.core.tracking import print_main
from alignment.data.layout import IGNORE, collate, collate_shared_prefix, pack_examples
from alignment.data.report import DataReport
from alignment.data.sampler import GlobalBatchSampler
from alignment.data.sft import build_sft_examples, count_targets
from alignment.data.sources import read_splits
from alignment.stages import tail


def nll_loss(model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum of -log p(target) over the supervised tokens of one micro-batch."""
    logp, _ = target_logprobs(model, batch)
    loss_sum = -logp.sum()
    tokens = float(batch["example_tokens"] if "example_tokens" in batch else batch["attention_mask"].sum())
    return loss_sum, {"nll": loss_sum.item(), "targets": float(logp.numel()), "tokens": tokens,
                      "tokens_computed": float(batch["attention_mask"].sum())}


def load_sft_data(recipe: SFTRecipe, tokenizer, is_main: bool):
    """Rows -> tokenized (and packed) training and eval items, with the data reports."""
    d = recipe.data
    rows, eval_rows = read_splits(d, recipe.seed)
    reports = [DataReport("train", rows.described), DataReport("eval", eval_rows.described)]
    train = build_sft_examples(rows, tokenizer, d, recipe.sft.assistant_only_loss, reports[0])
    evals = build_sft_examples(eval_rows, tokenizer, d, recipe.sft.assistant_only_loss, reports[1]) if eval_rows else []
    if d.packing:
        packed = pack_examples(train, d.max_length)
        print_main(is_main, f"packing: {len(train)} examples -> {len(packed)} rows of <= {d.max_length} tokens")
        train = packed
    if not train:
        raise ValueError(f"{d.train}: no usable training examples (see the data report above)")
    return train, evals, reports


@torch.no_grad()
def evaluate(engine, model, items: list, pad_id: int) -> dict[str, float]:
    """Mean token NLL over held-out items, sharded over ranks in lock-step (ZeRO-3 safe)."""
    micro, world = engine.layout.micro_batch_size, engine.dist.world_size
    model.eval()
    nll = targets = 0.0
    for b in range(math.ceil(len(items) / (micro * world))):
        start = (b * world + engine.dist.rank) * micro
        chunk = items[start : start + micro]
        weight = 1.0 if chunk else 0.0
        batch = loop.to_device(collate(chunk or items[:1], pad_id), engine.dist.device)
        logp, _ = target_logprobs(model, batch)
        nll += weight * -logp.sum().item()
        targets += weight * logp.numel()
    model.train()
    sums = engine.dist.reduce_sums({"nll": nll, "targets": targets})
    loss = sums["nll"] / max(1.0, sums["targets"])
    return {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 50.0)), "eval/targets": sums["targets"]}


def run(recipe: SFTRecipe, resume: bool = False, overwrite: bool = False) -> dict:
    # Step 1. Engine, output directory, resolved recipe, metrics logger.
    job, checkpoint = loop.setup_run(recipe, "sft", resume, overwrite)
    engine = job.engine

    # Step 2. Tokenizer and data (the data report counts everything dropped or cut).
    model_path = resolve_model_path(recipe.model.name_or_path, recipe.model.revision)
    tokenizer = load_tokenizer(recipe.model.tokenizer or model_path, recipe.model.trust_remote_code, recipe.model.revision)
    train_items, eval_items, reports = load_sft_data(recipe, tokenizer, engine.dist.is_main)
    tail.report_data(job, reports)
    sampler = GlobalBatchSampler(len(train_items), engine.layout, recipe.seed)
    print_main(engine.dist.is_main, sampler.describe())
    order = loop.data_order(sequence_fingerprint((it.input_ids, it.labels) for it in train_items),
                            len(train_items), engine, recipe.seed)
    loop.check_resume(checkpoint, order)
    steps = loop.total_steps(recipe, sampler.steps_per_epoch)

    # Step 3. Model: loaded (and sharded under ZeRO-3) inside the engine's init context, LoRA, wrap.
    model = loop.load_trainable_model(engine, recipe, model_path, "causal_lm")
    trainable, total = count_parameters(model)
    print_main(engine.dist.is_main, f"model {recipe.model.name_or_path}: {total / 1e6:.2f}M parameters, "
               f"{trainable / 1e6:.2f}M trainable; {steps} steps, {sampler.steps_per_epoch} per epoch")
    model = engine.prepare(model, steps)

    # Step 4. Resume (weights, optimizer, LR schedule, RNG, data position); the starting model's gold score.
    start = loop.resume(job, checkpoint, {"policy": model})
    gold = tail.score_start(job, model_path, recipe.sft.gold_eval, start)

    # Step 5. Train: each optimizer step is one global batch.
    pad_id = tokenizer.pad_token_id
    collate_micro = collate_shared_prefix if recipe.sft.share_prefix else collate
    if eval_items and start == 0 and recipe.train.eval_before_training:
        job.logger.log(evaluate(engine, model, eval_items, pad_id), step=0)
    progress = loop.make_progress(job, steps, start, "sft")
    clock = loop.Clock()
    metrics: dict = {}
    model.train()
    for step in range(start + 1, steps + 1):
        loop.debug_fault(step, engine.dist.rank)
        micro = [loop.to_device(collate_micro([train_items[i] for i in idx], pad_id), engine.dist.device)
                 for idx in sampler.micro_batches(step - 1, engine.dist.rank)]
        sums = loop.accumulated_step(engine, model, micro, lambda b: float(count_targets_batch(b)), nll_loss, step)
        elapsed = clock.lap()
        metrics = {
            "loss": sums["nll"] / sums["count"],
            "train/lr": sums["lr"],
            "train/grad_norm": engine.grad_norm(model),
            "train/tokens": sums["tokens"],
            "train/tokens_computed": sums["tokens_computed"],  # fewer with sft.share_prefix
            "train/targets": sums["targets"],
            "train/tokens_per_s": sums["tokens"] / max(elapsed, 1e-9),
            "train/epoch": (step - 1) / sampler.steps_per_epoch,
        }
        if eval_items and loop.eval_due(recipe, step, steps):
            metrics.update(evaluate(engine, model, eval_items, pad_id))
        if step % recipe.train.log_interval == 0 or step == steps or "eval/loss" in metrics:
            job.logger.log(metrics, step)
        progress.update(int(sums["tokens"]), loss=metrics["loss"])
        loop.step_boundary(job, {"policy": model}, step, steps, (step - 1) // sampler.steps_per_epoch, order)
    progress.close()
    final_eval = {k: v for k, v in metrics.items() if k.startswith("eval/")}

    # Step 6. Export final/ (reloaded in a fresh process and compared), its gold score, the manifest.
    tail.finish(job, model, tokenizer, kind="causal_lm", base_path=model_path, step=steps, gold=gold,
                metrics={"loss": metrics.get("loss"), **final_eval})
    return {"final_loss": metrics.get("loss"), "final_eval": final_eval, "gold": gold.as_dict(),
            "data": [r.as_dict() for r in reports]}


def count_targets_batch(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


__all__ = ["run", "nll_loss", "evaluate", "load_sft_data", "count_targets"]
