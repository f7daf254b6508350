# Sourced by tools/pretrain.sh and tools/finetune.sh: set-up, the shared argument convention
# ([CONFIG] [--nproc N] [key=value ...]) and the launch (one process, or torchrun on one node).
# The caller sets ROOT (the repository root) first.

bash "$ROOT/tools/setup.sh" ${ET_SETUP_ARGS:-}
cd "$ROOT"

# parse_launch_args "$@": sets CONFIG (the first argument unless it is a key=value or an option;
# empty when absent), NPROC (--nproc N / --nproc=N, default 1) and ARGS (the overrides).
parse_launch_args() {
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
}

# launch_module MODULE: python -m MODULE --config CONFIG ARGS..., under torchrun when NPROC > 1.
launch_module() {
  if [[ $NPROC -gt 1 ]]; then
    exec .venv/bin/torchrun --standalone --nproc_per_node "$NPROC" -m "$1" --config "$CONFIG" "${ARGS[@]+"${ARGS[@]}"}"
  fi
  exec .venv/bin/python -m "$1" --config "$CONFIG" "${ARGS[@]+"${ARGS[@]}"}"
}
