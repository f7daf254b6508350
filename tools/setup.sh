#!/usr/bin/env bash
# One set-up path for users and CI: creates .venv in the repo and installs the toolkit with the
# pinned, tested versions (tools/constraints.txt). Idempotent: when nothing changed since the last
# successful run it only re-checks the environment (seconds).
#
#   tools/setup.sh            core + detection extra (mmdet 3.3, mmengine, mmcv 2.1 with ops)
#   tools/setup.sh --core     core only (pretraining / fine-tuning; no mm* packages)
#
# Environment: PYTHON (interpreter for the venv, default python3), ET_CACHE_DIR (where the built
# mmcv wheel and the downloaded DALI wheel are cached, default ~/.cache/efficienttrain-toolkit),
# MAX_JOBS (mmcv build jobs).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
WITH_DET=1
for arg in "$@"; do
  case "$arg" in
    --core) WITH_DET=0 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg' (allowed: --core, --help)" >&2; exit 2 ;;
  esac
done

PYTHON=${PYTHON:-python3}
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
CONSTRAINTS="$ROOT/tools/constraints.txt"
pin() { sed -n "s/^$1==\(.*\)$/\1/p" "$CONSTRAINTS"; }
log() { echo "[setup] $*"; }

# The stamp records what a successful run installed; a change to any input re-runs the install.
stamp_inputs() { cat "$ROOT/tools/setup.sh" "$CONSTRAINTS" "$ROOT/pyproject.toml"; echo "det=$WITH_DET"; }
STAMP="$VENV/.setup-stamp"
want_stamp=$(stamp_inputs | sha256sum | cut -d' ' -f1)

verify() {
  # Imports and runs the compiled ops: an install that imports but cannot run nms is not done.
  "$PY" - "$WITH_DET" <<'PY'
import sys, warnings
warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # mmengine's import
import torch, torchvision, timm, numpy, yaml
from torchvision.ops import nms
boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 11., 11.], [50., 50., 60., 60.]])
scores = torch.tensor([0.9, 0.8, 0.7])
keep = nms(boxes, scores, 0.5).tolist()
assert keep == [0, 2], f"torchvision.ops.nms returned {keep}"
import efficienttrain  # the toolkit itself
import nvidia.dali  # the DALI data path (data.decode=dali; its CPU backend runs without CUDA)
msg = (f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
       f"DALI {nvidia.dali.__version__}")
if sys.argv[1] == "1":
    import mmcv, mmdet, mmengine, pycocotools
    from mmcv.ops import nms as mmcv_nms
    dets, inds = mmcv_nms(boxes, scores, 0.5)
    assert inds.tolist() == [0, 2], f"mmcv.ops.nms returned {inds.tolist()}"
    from mmengine.utils import get_installed_path
    get_installed_path("mmdet")  # what `_base_ = "mmdet::..."` configs resolve through (pkg_resources)
    msg += f", mmcv {mmcv.__version__} (ops ok), mmdet {mmdet.__version__}, mmengine {mmengine.__version__}"
print("[setup] environment ok:", msg)
PY
}

if [[ -x "$PY" && -f "$STAMP" && "$(cat "$STAMP")" == "$want_stamp" ]]; then
  if verify; then exit 0; fi
  log "environment check failed; reinstalling"
fi

"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 9), sys.version' \
  || { echo "setup.sh: Python >= 3.9 is required (PYTHON=$PYTHON)" >&2; exit 1; }
[[ -x "$PY" ]] || { log "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
rm -f "$STAMP"
pip_() { "$PY" -m pip install --disable-pip-version-check -q -c "$CONSTRAINTS" "$@"; }

# 1. torch + torchvision from the package registry. Some machines pre-configure a local find-links
#    folder holding a CPU-only torch wheel that torchvision's compiled ops cannot load with; the
#    registry build (CUDA-enabled) runs on CPU and GPU alike, so we bypass local pip configuration.
TORCH_V=$(pin torch); TV_V=$(pin torchvision)
# (registry builds carry a local label, e.g. 2.13.0+cu130: compare the public version)
if ! "$PY" -c "import torch, torchvision, sys; v = lambda m: m.__version__.split('+')[0]; sys.exit(v(torch) != '$TORCH_V' or v(torchvision) != '$TV_V')" 2>/dev/null; then
  log "installing torch==$TORCH_V torchvision==$TV_V from the registry (large download on first run)"
  env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "$PY" -m pip install --disable-pip-version-check -q \
    "torch==$TORCH_V" "torchvision==$TV_V"
fi

# 2. mmcv 2.1.0 with compiled ops. No wheel with ops exists for current torch, so we build it once
#    and cache the wheel per (mmcv, torch, python) triple. Its setup.py only builds with
#    setuptools<70 (newer releases break it, the newest also drop pkg_resources), and it must see
#    the installed torch (no build isolation).
if [[ $WITH_DET == 1 ]]; then
  MMCV_V=$(pin mmcv)
  PYTAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  CACHE="${ET_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/efficienttrain-toolkit}/wheels/mmcv-$MMCV_V-torch$TORCH_V-$PYTAG"
  if ! "$PY" -c "import mmcv, sys; from mmcv.ops import nms; sys.exit(mmcv.__version__ != '$MMCV_V')" 2>/dev/null; then
    if ! ls "$CACHE"/mmcv-"$MMCV_V"-*.whl >/dev/null 2>&1; then
      log "building mmcv==$MMCV_V with ops (about 10 minutes on 2 cores; cached in $CACHE)"
      # not through pip_: the runtime setuptools pin (>=77, torch's floor) is re-applied in step 3
      log "(pip will warn that torch wants setuptools>=77: expected during the build, fixed in step 3)"
      "$PY" -m pip install --disable-pip-version-check -q "setuptools<70" wheel ninja
      mkdir -p "$CACHE.tmp"
      # --no-cache-dir: never take a wheel pip cached from a build against another torch (C++ ABI)
      MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip wheel --disable-pip-version-check -q --no-cache-dir \
        --no-build-isolation --no-deps --no-binary mmcv "mmcv==$MMCV_V" -w "$CACHE.tmp"
      rm -rf "$CACHE"; mv "$CACHE.tmp" "$CACHE"   # publish the cache only once the build succeeded
    fi
    log "installing mmcv from $CACHE"
    pip_ "$CACHE"/mmcv-"$MMCV_V"-*.whl
  fi
fi

# 3. NVIDIA DALI (the data path's decoder): a 200 MB wheel, downloaded once into the cache and
#    installed from there (its small dependencies come from the registry, pinned).
DALI_PKG=nvidia-dali-cuda130; DALI_V=$(pin "$DALI_PKG"); DALI_WHL="nvidia_dali_cuda130-$DALI_V-*.whl"
DALI_CACHE="${ET_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/efficienttrain-toolkit}/wheels/dali-$DALI_V"
if ! "$PY" -c "import nvidia.dali, sys; sys.exit(nvidia.dali.__version__ != '$DALI_V')" 2>/dev/null; then
  # shellcheck disable=SC2086  # the glob is meant
  if ! ls "$DALI_CACHE"/$DALI_WHL >/dev/null 2>&1; then
    log "downloading $DALI_PKG==$DALI_V (about 200 MB, once; cached in $DALI_CACHE)"
    rm -rf "$DALI_CACHE.tmp"; mkdir -p "$DALI_CACHE.tmp"
    "$PY" -m pip download --disable-pip-version-check -q --no-deps "$DALI_PKG==$DALI_V" -d "$DALI_CACHE.tmp"
    rm -rf "$DALI_CACHE"; mv "$DALI_CACHE.tmp" "$DALI_CACHE"   # publish only a complete download
  fi
  log "installing $DALI_PKG from $DALI_CACHE"
  # shellcheck disable=SC2086
  pip_ "$DALI_CACHE"/$DALI_WHL
fi

# 4. The toolkit (editable) with its dependencies, pinned by the constraints file. This also
#    restores the pinned setuptools: torch needs >=77 and mmengine still imports pkg_resources,
#    which the newest setuptools releases dropped.
log "installing the toolkit (pip install -e .$([[ $WITH_DET == 1 ]] && echo '[det]'))"
if [[ $WITH_DET == 1 ]]; then pip_ -e ".[det,dev]" "setuptools"; else pip_ -e ".[dev]" "setuptools"; fi

verify
echo "$want_stamp" > "$STAMP"
log "done: activate with 'source .venv/bin/activate'"
