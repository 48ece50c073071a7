#!/usr/bin/env bash
# Several nodes over ssh from a DeepSpeed-style hostfile ("hostname slots=N" per line).
# The hostfile is parsed strictly before anything starts; if any node fails, the others
# are stopped and this exits non-zero with that node's code.
#   launch/multinode.sh hostfile sft configs/smollm2/sft.yaml --set train.max_steps=100
set -euo pipefail
cd "$(dirname "$0")/.."
HOSTFILE=$1; shift
exec "${PY:-.venv/bin/python}" -m alignment.cluster.launch ssh --hostfile "$HOSTFILE" --port "${MASTER_PORT:-29500}" -- "$@"
