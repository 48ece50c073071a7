"""Run on 2 ranks (torchrun) by tests/core/test_models.py: a cold built-in model cache where rank 1
takes the build lock first. Each rank then loads the entry and writes what it found to OUT/rank{r}.json."""

import json
import os
import sys

import torch.distributed as dist


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    import alignment  # noqa: F401  (registers the built-in models)
    from alignment.core.models import resolve_model_path

    if rank == 1:
        path = resolve_model_path("tiny-llama")  # rank 1 builds while rank 0 waits at the barrier
    dist.barrier()
    if rank == 0:
        path = resolve_model_path("tiny-llama")
    dist.barrier()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    facts = {"path": path, "files": sorted(os.listdir(path))}
    try:
        model = AutoModelForCausalLM.from_pretrained(path)
        AutoTokenizer.from_pretrained(path)
        facts["layers"] = model.config.num_hidden_layers
    except Exception as exc:  # reported, not raised: the test prints what each rank saw
        facts["error"] = f"{type(exc).__name__}: {exc}"
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump(facts, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
