#!/usr/bin/env bash
# Multi-GPU / multi-node detection training (torchrun; one process per GPU).
#
#   tools/det_dist_train.sh CONFIG NGPUS [tools/det_train.py args ...]
#
# NGPUS is the number of processes (GPUs) on THIS node, not the total: `CONFIG 16` starts 16
# processes on one node. More nodes: run the same command on every node with NNODES and NODE_RANK
# set; the world size is NNODES x NGPUS. One node of 8 GPUs:
#   tools/det_dist_train.sh configs/detection/cascade-mask-rcnn_vit-b-mae_sfp_1x_coco.py 8 \
#       --cfg-options data_root=/data/coco/ pretrained=runs/mae_vit-b_etpp_400e/encoder.pth
# Two nodes of 8 GPUs (16 processes; the *_vitdet_100ep configs' 64 images per step, 4 per GPU):
#   node0$ NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 tools/det_dist_train.sh CONFIG 8 --cfg-options ...
#   node1$ NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 tools/det_dist_train.sh CONFIG 8 --cfg-options ...
#
# Environment: NNODES (default 1), NODE_RANK (0..NNODES-1, default 0), MASTER_ADDR (node 0's
# address, default 127.0.0.1), PORT (default 29500).
# The 1x configs' LR is for 16 images per step (8 GPUs x 2 images), the *_vitdet_100ep configs'
# for 64 (16 GPUs x 4); for another total add --cfg-options auto_scale_lr.enable=True (linear
# scaling, every layer-decay group alike).
# mmengine's DDP wrapper needs GPUs (it passes device_ids), so this launcher is for GPU machines;
# on a CPU use tools/det_train.py. ET_SETUP_ARGS is passed to tools/setup.sh.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
usage() {
  echo "usage: [NNODES=N NODE_RANK=R MASTER_ADDR=HOST] $0 CONFIG NGPUS [tools/det_train.py args ...]" >&2
  echo "  NGPUS: a positive integer, the processes (GPUs) on THIS node; the world size is NNODES x NGPUS" >&2
  echo "  (two nodes of 8 GPUs: NNODES=2 NODE_RANK=0|1 MASTER_ADDR=<node 0> ... CONFIG 8 on each node)" >&2
}
if [[ ${1:-} == -h || ${1:-} == --help ]]; then
  sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"
  exit 0
fi
if [[ $# -lt 2 || ! $2 =~ ^[1-9][0-9]*$ ]]; then
  usage
  exit 2
fi
CONFIG=$1
NGPUS=$2
shift 2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
PORT=${PORT:-29500}
if ! [[ $NNODES =~ ^[1-9][0-9]*$ && $NODE_RANK =~ ^[0-9]+$ ]] || (( NODE_RANK >= NNODES )); then
  echo "error: NNODES=$NNODES NODE_RANK=$NODE_RANK: NNODES must be a positive integer and NODE_RANK one of 0..NNODES-1" >&2
  usage
  exit 2
fi
if (( NNODES > 1 )) && [[ $MASTER_ADDR == 127.0.0.1 ]]; then
  echo "error: NNODES=$NNODES needs MASTER_ADDR, the address of node 0 (the same on every node)" >&2
  usage
  exit 2
fi
echo "[det_dist_train] $NGPUS process(es) on this node (node $NODE_RANK of $NNODES): world size $((NNODES * NGPUS))"
bash "$ROOT/tools/setup.sh" ${ET_SETUP_ARGS:-}
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m torch.distributed.run \
  --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="$PORT" \
  --nproc_per_node="$NGPUS" \
  "$ROOT/tools/det_train.py" "$CONFIG" --launcher pytorch "$@"
