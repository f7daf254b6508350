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
source "$ROOT/tools/_launch.sh"
parse_launch_args "$@"
CONFIG=${CONFIG:-configs/pretrain/demo.yaml}
launch_module pretrain
