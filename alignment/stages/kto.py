"""KTO: alignment from single answers labelled good or bad (a thumbs up or down), not pairs.

    align kto configs/tiny/kto.yaml [--set data.train=thumbs.jsonl] [--nproc 2] [--resume]

A stage of its own rather than a DPO loss: its rows, its batches and its reference point differ from DPO's.
Rows are unpaired (prompt, completion, label), or preference rows split into a good and a bad answer
(alignment.data.unpaired). Each micro-batch holds B answers; the reference point z0 is estimated from the same
B answers paired with other prompts of the micro-batch (prompt i with answer i - 1, as TRL's KTOTrainer does), so
the micro-batch is KTO's batch of the paper (sec. 4.1), averaged over ranks. The loss (alignment.rlhf.kto_losses,
eq. 8) of a step is the mean over the global batch's answers.

Steps: 1. engine and run; 2. tokenizer and labelled answers; 3. the reference (a frozen copy, or the policy with
its LoRA adapter off); 4. the policy, resume, the starting model's gold score; 5. train; 6. export, gold score.
"""

from __future__ import annotations

import math

import torch

from alignment.core import loop
from alignment.core.fingerprint import sequence_fingerprint
from alignment.core.models import count_parameters, load_model, load_tokenizer, resolve_model_path
from alignment.core.modeling import sequence_logprobs, user_model
from alignment.core.recipes import KTORecipe, validate_kto
from alignment.core.tracking import print_main
from alignment.data.layout import collate_sequences
from alignment.data.report import DataReport
from alignment.data.sampler import GlobalBatchSampler
from alignment.data.sources import read_splits
from alignment.data.unpaired import TokenizedAnswer, load_answers
from alignment.rlhf.kto_losses import kto_loss, kto_reference_point
from alignment.stages import tail


def kto_batch(answers: list[TokenizedAnswer], pad_id: int, device) -> dict:
    """B answers as 2B rows: each prompt with its own answer, then each prompt with the previous answer of the
    micro-batch (the mismatched pairs of the reference point)."""
    prompts = [a.prompt_ids for a in answers]
    own = [a.completion_ids for a in answers]
    other = own[-1:] + own[:-1]
    batch = loop.to_device(collate_sequences(prompts + prompts, own + other, pad_id), device)
    batch["desirable"] = torch.tensor([a.desirable for a in answers], device=device)
    return batch


def make_loss_fn(recipe: KTORecipe, mode: str, frozen, dist):
    """Micro-batch loss: the sum of its answers' KTO losses, with metric sums. The reference point is this
    micro-batch's mismatched log-ratio, averaged over ranks (every rank calls this in lock-step)."""
    cfg = recipe.kto

    def reference_logps(model, batch):
        with torch.no_grad():
            if mode == "adapter":
                with user_model(model).disable_adapter():
                    return sequence_logprobs(model, batch)[0]
            return sequence_logprobs(frozen, batch)[0]

    def fn(model, batch):
        B = batch["desirable"].shape[0]
        total, _ = sequence_logprobs(model, batch)
        policy_logps, policy_kl = total[:B], total[B:].detach()
        ref = reference_logps(model, batch)
        z0_local = kto_reference_point(policy_kl, ref[B:])
        z0 = torch.tensor(dist.reduce_sums({"z0": float(z0_local)})["z0"] / dist.world_size,
                          device=policy_logps.device)
        losses = kto_loss(policy_logps, ref[:B], batch["desirable"], z0, cfg.beta, cfg.desirable_weight,
                          cfg.undesirable_weight)
        rewards = cfg.beta * (policy_logps.detach() - ref[:B])
        good = batch["desirable"].bool()
        return losses.sum(), {"loss": float(losses.detach().sum()), "kl": float(z0) * B,
                              "reward_good": float(rewards[good].sum()), "n_good": float(good.sum()),
                              "reward_bad": float(rewards[~good].sum()), "n_bad": float((~good).sum()),
                              "tokens": float(batch["attention_mask"][:B].sum())}

    return fn


def summarize(sums: dict, prefix: str = "") -> dict:
    n = max(sums["count"], 1.0)
    out = {f"{prefix}loss": sums["loss"] / n, f"{prefix}objective/kl": sums["kl"] / n}
    good = sums["reward_good"] / sums["n_good"] if sums["n_good"] else None
    bad = sums["reward_bad"] / sums["n_bad"] if sums["n_bad"] else None
    if good is not None:
        out[f"{prefix}rewards/desirable"] = good
    if bad is not None:
        out[f"{prefix}rewards/undesirable"] = bad
    if good is not None and bad is not None:
        out[f"{prefix}rewards/margins"] = good - bad
    return out


@torch.no_grad()
def evaluate(engine, model, answers: list[TokenizedAnswer], pad_id: int, loss_fn) -> dict:
    """Held-out KTO metrics over every answer, in lock-step over ranks (micro-batches as in training)."""
    micro, world = engine.layout.micro_batch_size, engine.dist.world_size
    model.eval()
    sums: dict[str, float] = {}
    for b in range(math.ceil(len(answers) / (micro * world))):
        start = (b * world + engine.dist.rank) * micro
        chunk = answers[start : start + micro]
        weight = 1.0 if len(chunk) > 1 else 0.0  # a reference point needs two answers
        _, stats = loss_fn(model, kto_batch(chunk if len(chunk) > 1 else answers[:2], pad_id, engine.dist.device))
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + weight * v
    model.train()
    reduced = engine.dist.reduce_sums(sums)
    reduced["count"] = reduced["n_good"] + reduced["n_bad"]
    return summarize(reduced, "eval/")


def run(recipe: KTORecipe, resume: bool = False, overwrite: bool = False) -> dict:
    ref_mode = validate_kto(recipe)  # the checks load_recipe ran, and the resolved reference mode
    cfg = recipe.kto
    # Step 1. Engine, output directory, resolved recipe, metrics logger.
    job, checkpoint = loop.setup_run(recipe, "kto", resume, overwrite)
    engine = job.engine

    # Step 2. Tokenizer and labelled answers, data report, the order of the examples.
    model_path = resolve_model_path(recipe.model.name_or_path, recipe.model.revision)
    tokenizer = load_tokenizer(recipe.model.tokenizer or model_path, recipe.model.trust_remote_code, recipe.model.revision)
    rows, eval_rows = read_splits(recipe.data, recipe.seed)
    reports = [DataReport("train", rows.described), DataReport("eval", eval_rows.described)]
    train = load_answers(rows, tokenizer, recipe.data, cfg.max_prompt_length, reports[0])
    evals = load_answers(eval_rows, tokenizer, recipe.data, cfg.max_prompt_length, reports[1]) if eval_rows else []
    tail.report_data(job, reports)
    good = sum(a.desirable for a in train)
    print_main(engine.dist.is_main, f"answers: {good} desirable, {len(train) - good} undesirable")
    pad_id = tokenizer.pad_token_id
    sampler = GlobalBatchSampler(len(train), engine.layout, recipe.seed)
    print_main(engine.dist.is_main, sampler.describe())
    order = loop.data_order(sequence_fingerprint((a.prompt_ids, a.completion_ids, [int(a.desirable)]) for a in train),
                            len(train), engine, recipe.seed)
    loop.check_resume(checkpoint, order)
    steps = loop.total_steps(recipe, sampler.steps_per_epoch)

    # Step 3. Reference: a frozen copy of the starting model, or the policy with its adapter off.
    frozen = None
    if ref_mode == "model":
        with engine.model_init(trainable=False):
            frozen = engine.prepare_frozen(load_model(model_path, "causal_lm", revision=recipe.model.revision,
                                                      trust_remote_code=recipe.model.trust_remote_code,
                                                      attn_implementation=loop.attention_implementation(engine, recipe)))

    # Step 4. Policy: loaded (sharded under ZeRO-3), LoRA, wrapped; resume; the starting model's gold score.
    policy = loop.load_trainable_model(engine, recipe, model_path, "causal_lm", disable_dropout=cfg.disable_dropout)
    trainable, total = count_parameters(policy)
    print_main(engine.dist.is_main, f"policy {recipe.model.name_or_path}: {total / 1e6:.2f}M parameters, "
               f"{trainable / 1e6:.2f}M trainable; KTO beta {cfg.beta}, weights {cfg.desirable_weight} / "
               f"{cfg.undesirable_weight}, reference {ref_mode}; {steps} steps, {sampler.steps_per_epoch} per epoch")
    policy = engine.prepare(policy, steps)
    start = loop.resume(job, checkpoint, {"policy": policy})
    gold = tail.score_start(job, model_path, cfg.gold_eval, start)

    # Step 5. Train: each micro-batch its answers and their mismatched pairs; the loss of eq. 8.
    loss_fn = make_loss_fn(recipe, ref_mode, frozen, engine.dist)
    progress = loop.make_progress(job, steps, start, "kto")
    clock = loop.Clock()
    metrics: dict = {}
    if evals and start == 0 and recipe.train.eval_before_training:
        job.logger.log(evaluate(engine, policy, evals, pad_id, loss_fn), step=0)
    policy.train()
    for step in range(start + 1, steps + 1):
        loop.debug_fault(step, engine.dist.rank)
        micro = [kto_batch([train[i] for i in idx], pad_id, engine.dist.device)
                 for idx in sampler.micro_batches(step - 1, engine.dist.rank)]
        sums = loop.accumulated_step(engine, policy, micro, lambda b: float(b["desirable"].shape[0]), loss_fn, step)
        elapsed = clock.lap()
        metrics = {**summarize(sums), "train/lr": sums["lr"], "train/grad_norm": engine.grad_norm(policy),
                   "train/answers_per_s": sums["count"] / max(elapsed, 1e-9),
                   "train/tokens_per_s": sums["tokens"] / max(elapsed, 1e-9),
                   "train/epoch": (step - 1) / sampler.steps_per_epoch}
        if evals and loop.eval_due(recipe, step, steps):
            metrics.update(evaluate(engine, policy, evals, pad_id, loss_fn))
        if step % recipe.train.log_interval == 0 or step == steps or "eval/loss" in metrics:
            job.logger.log(metrics, step)
        progress.update(int(sums["tokens"]), loss=metrics["loss"])
        loop.step_boundary(job, {"policy": policy}, step, steps, (step - 1) // sampler.steps_per_epoch, order)
    progress.close()

    # Step 6. Export final/ (reloaded in a fresh process and compared), its gold score, the manifest.
    tail.finish(job, policy, tokenizer, kind="causal_lm", base_path=model_path, step=steps, gold=gold,
                metrics=metrics)
    return {"metrics": metrics, "data": [r.as_dict() for r in reports], "gold": gold.as_dict()}
