#!/usr/bin/env bash
# Detection transfer (MMDetection 3.x).
#
#   tools/det_train.sh                       # the demo: tiny RetinaNet and Cascade Mask R-CNN, end to end
#   tools/det_train.sh CONFIG [args ...]     # = .venv/bin/python tools/det_train.py CONFIG [args ...]
#
# The demo trains both detectors on the synthetic COCO-format set (tools/make_demo_coco.py: 600
# images of 48-64 px with squares, discs and triangles) from the demo MAE encoder (runs
# `bash tools/pretrain.sh` first when runs/demo/encoder.pth is missing, about 2 minutes),
# evaluates each final checkpoint with tools/det_test.py, prints the COCO AP tables and writes
# OUT/<detector>/predictions.png: about 5 minutes on a 2-core CPU (both detectors side by side).
# Demo locations (environment, defaults in brackets): DET_DEMO_ENCODER [runs/demo/encoder.pth; when
# set, it must exist], DET_DEMO_DATA [data/demo_coco], DET_DEMO_OUT [runs/det_demo: work dirs
# retinanet/ and cascade-mask-rcnn/]. ET_SETUP_ARGS is passed to tools/setup.sh.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/tools/setup.sh" ${ET_SETUP_ARGS:-}
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
if [[ $# -gt 0 ]]; then
  exec "$PY" "$ROOT/tools/det_train.py" "$@"
fi

ENCODER=${DET_DEMO_ENCODER:-runs/demo/encoder.pth}
DATA=${DET_DEMO_DATA:-data/demo_coco}
OUT=${DET_DEMO_OUT:-runs/det_demo}
if [[ ! -f $ENCODER ]]; then
  if [[ -n ${DET_DEMO_ENCODER:-} ]]; then
    echo "det_train.sh: DET_DEMO_ENCODER=$ENCODER does not exist" >&2
    exit 2
  fi
  echo "[det demo] $ENCODER is missing: running the MAE pretraining demo first"
  bash "$ROOT/tools/pretrain.sh"
fi
"$PY" "$ROOT/tools/make_demo_coco.py" "$DATA"
# Tiny models on tiny images: one intra-op thread per process is much faster than OpenMP hand-offs
# (measured on a loaded 2-core machine: 0.45 s vs up to 10 s per Cascade Mask R-CNN iteration), so
# on a machine with 2+ cores the two detectors train side by side, one core each.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
demo() {   # train, then evaluate (AP table + predictions.png) one demo detector
  local name=$1 cfg=configs/detection/${1}_vit-tiny-mae_sfp_demo.py wd=$OUT/$1
  "$PY" "$ROOT/tools/det_train.py" "$cfg" --work-dir "$wd" --cfg-options "data_root=${DATA%/}/" "pretrained=$ENCODER"
  "$PY" "$ROOT/tools/det_test.py" "$cfg" "$(cat "$wd/last_checkpoint")" --work-dir "$wd" \
    --cfg-options "data_root=${DATA%/}/" > "$wd/test_summary.txt"
}
names=(retinanet cascade-mask-rcnn)
start=$SECONDS
# (nproc itself follows OMP_NUM_THREADS, set above: ask it without)
if [[ $(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) -ge 2 ]]; then
  pids=()
  for name in "${names[@]}"; do
    mkdir -p "$OUT/$name"
    echo "[det demo] training and evaluating $name in the background: log $OUT/$name/demo.log"
    demo "$name" > "$OUT/$name/demo.log" 2>&1 &
    pids+=($!)
  done
  failed=()
  for k in "${!names[@]}"; do
    wait "${pids[$k]}" || failed+=("${names[$k]}")
  done
  for name in "${failed[@]}"; do
    echo "[det demo] $name failed; the end of $OUT/$name/demo.log:" >&2
    tail -n 30 "$OUT/$name/demo.log" >&2
  done
  [[ ${#failed[@]} -eq 0 ]] || exit 1
else
  for name in "${names[@]}"; do
    mkdir -p "$OUT/$name"
    echo "[det demo] training and evaluating $name: log $OUT/$name/demo.log"
    demo "$name" > "$OUT/$name/demo.log" 2>&1 || { tail -n 30 "$OUT/$name/demo.log" >&2; exit 1; }
  done
fi
echo
echo "[det demo] done in $((SECONDS - start)) s. COCO AP (%) on the demo val set:"
for name in "${names[@]}"; do
  echo "== $name"
  sed -n '/^COCO AP/,$p' "$OUT/$name/test_summary.txt" | tail -n +2
done
