#!/usr/bin/env bash
# Fine-tuning, linear probing, supervised curriculum training and evaluation.
#
#   tools/finetune.sh                                   # the demo: fine-tune the demo MAE encoder
#                                                       # (runs the pretraining demo first if needed)
#   tools/finetune.sh CONFIG [key=value ...]            # e.g. configs/finetune/mae_vit-b_finetune.yaml
#   tools/finetune.sh CONFIG --nproc 8 [key=value ...]  # one node, 8 processes (torchrun)
#   tools/finetune.sh CONFIG mode=eval model.checkpoint=runs/x/checkpoints/checkpoint-best.pth
#   tools/finetune.sh CONFIG --dry-run | --print-config # check and print the plan | the resolved config
#   tools/finetune.sh --help                            # this, and every config section
#
# Relative paths (CONFIG, data.path, model.checkpoint, train.output_dir) are relative to where you
# call it from.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/tools/_launch.sh"
parse_launch_args "$@"
if [[ $HELP == 1 ]]; then show_help "${BASH_SOURCE[0]}" finetune; exit 0; fi
if [[ -z $CONFIG ]]; then
  CONFIG=$ROOT/configs/finetune/demo.yaml
  # the demo needs the demo encoder: pretrain it first unless it is there (or given as an override, or
  # this is only a --dry-run / --print-config)
  if [[ ! -f runs/demo/encoder.pth ]] && ! printf '%s\n' "${ARGS[@]+"${ARGS[@]}"}" \
      | grep -q -e '^model.checkpoint=' -e '^--dry-run$' -e '^--print-config$'; then
    echo "[finetune] no runs/demo/encoder.pth yet: running the pretraining demo first"
    ET_SETUP_ARGS=${ET_SETUP_ARGS:-} bash "$ROOT/tools/pretrain.sh"
  fi
fi
launch_module finetune
