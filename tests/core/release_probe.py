"""Run by tests/core/test_optimizer_release.py in a fresh process: ZERO_STAGE PRECISION.

One optimizer step of the tiny model through the engine, then Engine.release_optimizer_state: prints
JSON facts (bytes freed, whether every tensor of the optimizer state is really gone, whether a further
step refuses, whether the weights are untouched)."""

import gc
import json
import sys
import weakref

import torch

from alignment.core.config import DeepSpeedConfig, TrainConfig
from alignment.core.engine import Engine
from alignment.core.modeling import user_model
from alignment.core.models import load_model, resolve_model_path


def state_tensors(model) -> list:
    found, optimizer, seen = [], model.optimizer, set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        if isinstance(optimizer, torch.optim.Optimizer):
            found += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.numel() > 1]
        optimizer = getattr(optimizer, "optimizer", None)
    return found


def main(zero_stage: int, precision: str) -> None:
    engine = Engine(TrainConfig(global_batch_size=2, micro_batch_size=2, precision=precision, learning_rate=1e-3),
                    DeepSpeedConfig(zero_stage=zero_stage), seed=0)
    with engine.model_init():
        module = load_model(resolve_model_path("tiny-llama"), "causal_lm")
    model = engine.prepare(module, total_steps=2)
    ids = torch.randint(0, 100, (2, 8))
    loss = model(lambda m, x: m(input_ids=x, labels=x).loss, ids)
    engine.backward(model, loss)
    engine.step(model)
    tensors = state_tensors(model)
    expected = sum(t.numel() * t.element_size() for t in tensors)
    refs = [weakref.ref(t) for t in tensors]
    del tensors
    with engine.gathered_parameters(user_model(model)):
        before = {n: p.detach().clone() for n, p in user_model(model).named_parameters()}
    freed = engine.release_optimizer_state(model)
    gc.collect()
    with engine.gathered_parameters(user_model(model)):
        same = all(torch.equal(before[n], p.detach()) for n, p in user_model(model).named_parameters())
    try:
        engine.step(model)
        refused = False
    except RuntimeError as exc:
        refused = "released" in str(exc)
    print(json.dumps({"expected": expected, "freed": freed, "alive": sum(r() is not None for r in refs),
                      "count": len(refs), "weights_same": same, "step_refused": refused}))
    engine.close()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
