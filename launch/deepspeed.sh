#!/usr/bin/env bash
# DeepSpeed's own launcher, for those who use it: one node, a hostfile over ssh/pdsh, or one node of a
# hostfile at a time with --no_ssh (run this on every node with its --node_rank).
# Launcher options come first (--hostfile, --no_ssh, --node_rank, --master_addr, --master_port, --num_gpus,
# ...); the stage and its arguments follow. A hostfile is validated first: DeepSpeed falls back to the local
# GPUs on one it cannot parse.
#   launch/deepspeed.sh --num_gpus 8 sft configs/smollm2/sft.yaml
#   launch/deepspeed.sh --hostfile H sft configs/smollm2/sft.yaml
#   launch/deepspeed.sh --hostfile H --no_ssh --node_rank 1 --master_addr 10.0.0.1 sft configs/smollm2/sft.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ARGS=()
while [[ "${1:-}" == --* ]]; do
  case "$1" in
    --hostfile)
      "$PY" -c "import sys; from alignment.cluster.launch import parse_hostfile; parse_hostfile(sys.argv[1])" "$2"
      ARGS+=(--hostfile "$2"); shift 2 ;;
    --*=*|--no_ssh|--no_ssh_check|--force_multi|--no_python|--save_pid|--bind_cores_to_rank|--quiet)
      ARGS+=("$1"); shift ;;
    *) ARGS+=("$1" "$2"); shift 2 ;;
  esac
done
# Ranks read LOCAL_RANK from the environment; `--local_rank=N` on the command line is not an align option.
exec "$PY" -m deepspeed.launcher.runner "${ARGS[@]}" --no_local_rank --module alignment.cli "$@"
