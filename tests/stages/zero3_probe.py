"""Run on 2 ranks (torchrun) by tests/test_pref_distributed.py: ZeRO-3 construction checks.

Writes, per rank, the gathered reward head (FAILURES row 5) and facts about the frozen
reference engine (FAILURES row 23) to OUT/rank{r}.pt.
"""

import sys

import torch

from alignment.core.config import DeepSpeedConfig, TrainConfig
from alignment.core.engine import Engine
from alignment.core.models import load_model, resolve_model_path
from reward.train import init_head


def main(out: str) -> None:
    engine = Engine(TrainConfig(global_batch_size=4, micro_batch_size=2, precision="fp32"),
                    DeepSpeedConfig(zero_stage=3), seed=0)
    path = resolve_model_path("tiny-llama")
    with engine.model_init():
        reward_model = load_model(path, "reward")
    with engine.gathered_parameters(reward_model):
        head = reward_model.score.weight.detach().clone()
    init_head(engine, reward_model, std=0.5)  # rm.head_init_std, as the rm stage applies it
    with engine.gathered_parameters(reward_model):
        head_std = reward_model.score.weight.detach().clone()
    with engine.model_init(trainable=False):
        reference = engine.prepare_frozen(load_model(path, "causal_lm"))
    facts = {
        "head": head,
        "head_std": head_std,
        "head_partitioned": hasattr(reward_model.score.weight, "ds_id"),
        "ref_requires_grad": any(p.requires_grad for p in reference.module.parameters()),
        "ref_optimizer": type(getattr(reference, "optimizer", None)).__name__,
        "ref_optimizer_state": len(getattr(getattr(reference, "optimizer", None), "state", None) or {}),
        "ref_has_fp32_master": hasattr(getattr(reference, "optimizer", None), "fp32_partitioned_groups_flat"),
        "ref_partitioned": all(hasattr(p, "ds_id") for p in reference.module.parameters()),
        "ref_local_numel": sum(p.numel() for p in reference.module.parameters()),
        "ref_full_numel": sum(p.ds_numel for p in reference.module.parameters()),
    }
    torch.save(facts, f"{out}/rank{engine.dist.rank}.pt")
    engine.close()


if __name__ == "__main__":
    main(sys.argv[1])
