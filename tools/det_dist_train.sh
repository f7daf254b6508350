#!/usr/bin/env bash
# Multi-GPU / multi-node detection training (torchrun; one process per GPU).
#
#   tools/det_dist_train.sh CONFIG NGPUS [tools/det_train.py args ...]
#   tools/det_dist_train.sh configs/detection/cascade-mask-rcnn_vit-b-mae_sfp_1x_coco.py 8 \
#       --cfg-options data_root=/data/coco/ pretrained=runs/mae_vit-b_etpp_400e/encoder.pth
#
# Multi-node: run the same command on every node with
#   NNODES (default 1)  NODE_RANK (0..NNODES-1, default 0)  MASTER_ADDR (default 127.0.0.1)  PORT (default 29500)
# The 1x configs' LR is for 16 images per step (8 GPUs x 2 images), the *_vitdet_100ep configs'
# for 64 (16 GPUs x 4); for another total add --cfg-options auto_scale_lr.enable=True (linear
# scaling, every layer-decay group alike).
# mmengine's DDP wrapper needs GPUs (it passes device_ids), so this launcher is for GPU machines;
# on a CPU use tools/det_train.py. ET_SETUP_ARGS is passed to tools/setup.sh.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ $# -lt 2 || ! $2 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 CONFIG NGPUS [tools/det_train.py args ...]   (NGPUS: a positive integer)" >&2
  exit 2
fi
CONFIG=$1
NGPUS=$2
shift 2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
PORT=${PORT:-29500}
bash "$ROOT/tools/setup.sh" ${ET_SETUP_ARGS:-}
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m torch.distributed.run \
  --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="$PORT" \
  --nproc_per_node="$NGPUS" \
  "$ROOT/tools/det_train.py" "$CONFIG" --launcher pytorch "$@"
