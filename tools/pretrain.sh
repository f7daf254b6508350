#!/usr/bin/env bash
# MAE + EfficientTrain++ pretraining (the main job).
#
#   tools/pretrain.sh                                  # set up, then the demo (configs/pretrain/demo.yaml)
#   tools/pretrain.sh CONFIG [key=value ...]           # any config, with overrides
#   tools/pretrain.sh CONFIG --nproc 8 [key=value ...] # one node, 8 processes (torchrun)
#   tools/pretrain.sh CONFIG --dry-run                 # check config, data and resume; print the plan
#   tools/pretrain.sh CONFIG --print-config            # the resolved config
#   tools/pretrain.sh --help                           # this, and every config section
#
# Relative paths (CONFIG, data.path, train.output_dir) are relative to where you call it from.
# Multi-node: run on every node
#   .venv/bin/python -m engine.launch --nnodes N --node_rank R --master_addr HOST --master_port 29500 \
#       --nproc_per_node 8 -m pretrain --config CONFIG [key=value ...]
# ET_SETUP_ARGS is passed to tools/setup.sh (e.g. ET_SETUP_ARGS=--core skips the detection extra).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/tools/_launch.sh"
parse_launch_args "$@"
if [[ $HELP == 1 ]]; then show_help "${BASH_SOURCE[0]}" pretrain; exit 0; fi
CONFIG=${CONFIG:-$ROOT/configs/pretrain/demo.yaml}
launch_module pretrain
