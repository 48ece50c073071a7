#!/usr/bin/env bash
# The one canonical per-node command: torchrun starting `align STAGE RECIPE ...` on this node.
# Used unchanged for one GPU box, several nodes (launch/multinode.sh) and SLURM (launch/slurm.sbatch).
#   NNODES=1 NODE_RANK=0 GPUS_PER_NODE=8 MASTER_ADDR=127.0.0.1 launch/node.sh sft configs/smollm2/sft.yaml
# DRY_RUN=1 prints the exact command instead of running it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CMD=("$PY" -m torch.distributed.run
  --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}"
  --nproc_per_node="${GPUS_PER_NODE:-$("$PY" -c 'import torch; print(max(1, torch.cuda.device_count()))')}"
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}"
  -m alignment.cli "$@")
if [[ -n "${DRY_RUN:-}" ]]; then
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
# SIGUSR1 (SLURM's --signal=USR1@T) reaches every process of the job step: the ranks checkpoint and exit 75, but
# torchrun has no handler for it and would die of it first. An ignored signal stays ignored across exec; the ranks
# install their own handler (alignment.core.loop.watch_preemption).
trap '' USR1
exec "${CMD[@]}"
