"""Side-by-side benchmarks: this project's stages against TRL (speed, peak memory, quality), and a few of
its own (the labelling server under load, `align estimate` against measured memory, the GPU check).

Run each one as a module from the repository root, with the project's environment:

    .venv/bin/python -m bench.sft          # SFT tokens/s against TRL's SFTTrainer
    .venv/bin/python -m bench.rm           # reward-model pairs/s against RewardTrainer
    .venv/bin/python -m bench.dpo          # DPO pairs/s against DPOTrainer (default and fastest)
    .venv/bin/python -m bench.ppo          # GRPO / PPO episodes/s against TRL; ZeRO-3 rollout
    .venv/bin/python -m bench.label        # the labelling server under concurrent annotators
    .venv/bin/python -m bench.estimate     # `align estimate` against measured peak memory
    .venv/bin/python -m bench.rm_quality   # held-out accuracy of our reward model against TRL's
    .venv/bin/python -m bench.dpo_quality  # held-out implicit-reward accuracy of our DPO against TRL's
    .venv/bin/python -m bench.kto_quality  # the same for our KTO against TRL's KTOTrainer (unpaired answers)
    .venv/bin/python -m bench.gpu_check    # every stage on one GPU (--smoke: CPU, tiny model)

(`make bench` runs the first nine; `python -m bench.NAME --help` lists a benchmark's options.)

Modules:
- `bench.harness`: what the two sides of a comparison share: subprocesses with logs, timeouts and
  peak-memory sampling (PSS timelines), one environment and thread count per side, step clocks,
  the counting collator, throughput math, tables and RESULT lines, and the launchers of our CLI
  stage and of a TRL worker (each benchmark module runs its own workers as `-m bench.NAME --worker`).
- `bench.data`: the data both sides get: the hh-rlhf location (`--hh-rlhf DIR`, default
  `../shared/data/hh-rlhf-harmless` relative to the repository root, or $ALIGN_HH_RLHF), pair sets
  and TRL records, the built-in task's rows and prompts, the held-out split of the quality benchmarks.

Each comparison ends with one line per result that outside checks parse:

    RESULT name=<name> ours=<value> peer=<value> unit=<unit> ratio=<ours/peer>

(ratio = ours / peer with three decimals; `peer` is the other side, or a measurement where there is no
other tool; speed benchmarks add `RESULT name=<name>-peak-memory ... unit=MiB`, lower is better).
"""
