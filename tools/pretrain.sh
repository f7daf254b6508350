#!/usr/bin/env bash
# MAE + EfficientTrain++ pretraining (the main job).
#
#   tools/pretrain.sh                                  # set up, then the demo (configs/pretrain/demo.yaml)
#   tools/pretrain.sh CONFIG [key=value ...]           # any config, with overrides
#   tools/pretrain.sh CONFIG --nproc 8 [key=value ...] # one node, 8 processes (torchrun)
#
# Multi-node: run on every node
#   .venv/bin/torchrun --nnodes N --node_rank R --master_addr HOST --master_port 29500 \
#       --nproc_per_node 8 -m pretrain --config CONFIG [key=value ...]
# ET_SETUP_ARGS is passed to tools/setup.sh (e.g. ET_SETUP_ARGS=--core skips the detection extra).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/tools/setup.sh" ${ET_SETUP_ARGS:-}
cd "$ROOT"
CONFIG=configs/pretrain/demo.yaml
if [[ $# -gt 0 && $1 != *=* && $1 != --* ]]; then CONFIG=$1; shift; fi
NPROC=1
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nproc) NPROC=${2:?--nproc needs a number}; shift 2 ;;
    --nproc=*) NPROC=${1#--nproc=}; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
if [[ $NPROC -gt 1 ]]; then
  exec .venv/bin/torchrun --standalone --nproc_per_node "$NPROC" -m pretrain --config "$CONFIG" "${ARGS[@]+"${ARGS[@]}"}"
fi
exec .venv/bin/python -m pretrain --config "$CONFIG" "${ARGS[@]+"${ARGS[@]}"}"
