#!/usr/bin/env bash
# DeepSpeed's own launcher, for those who use it: one node (--num_gpus) or a hostfile.
# The hostfile is validated first: DeepSpeed falls back to local GPUs on one it cannot parse.
#   launch/deepspeed.sh [--hostfile H] sft configs/smollm2/sft.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ARGS=()
if [[ "${1:-}" == "--hostfile" ]]; then
  "$PY" -c "import sys; from alignment.cluster.launch import parse_hostfile; parse_hostfile(sys.argv[1])" "$2"
  ARGS=(--hostfile "$2"); shift 2
fi
exec "$PY" -m deepspeed.launcher.runner "${ARGS[@]}" --module alignment.cli "$@"
