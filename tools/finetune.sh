#!/usr/bin/env bash
# Fine-tuning, linear probing, supervised curriculum training and evaluation.
#
#   tools/finetune.sh                                   # the demo: fine-tune the demo MAE encoder
#                                                       # (runs the pretraining demo first if needed)
#   tools/finetune.sh CONFIG [key=value ...]            # e.g. configs/finetune/mae_vit-b_finetune.yaml
#   tools/finetune.sh CONFIG --nproc 8 [key=value ...]  # one node, 8 processes (torchrun)
#   tools/finetune.sh CONFIG mode=eval model.checkpoint=runs/x/checkpoints/checkpoint-best.pth
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/tools/setup.sh" ${ET_SETUP_ARGS:-}
cd "$ROOT"
CONFIG=""
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
if [[ -z $CONFIG ]]; then
  CONFIG=configs/finetune/demo.yaml
  # the demo needs the demo encoder: pretrain it first unless it is there (or given as an override)
  if [[ ! -f runs/demo/encoder.pth ]] && ! printf '%s\n' "${ARGS[@]+"${ARGS[@]}"}" | grep -q '^model.checkpoint='; then
    echo "[finetune] no runs/demo/encoder.pth yet: running the pretraining demo first"
    ET_SETUP_ARGS=${ET_SETUP_ARGS:-} bash tools/pretrain.sh
  fi
fi
if [[ $NPROC -gt 1 ]]; then
  exec .venv/bin/torchrun --standalone --nproc_per_node "$NPROC" -m finetune --config "$CONFIG" "${ARGS[@]+"${ARGS[@]}"}"
fi
exec .venv/bin/python -m finetune --config "$CONFIG" "${ARGS[@]+"${ARGS[@]}"}"
