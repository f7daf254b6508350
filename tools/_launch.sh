# Sourced by tools/pretrain.sh and tools/finetune.sh: the shared argument convention
# ([CONFIG] [--nproc N] [key=value ...]), --help, set-up and the launch (one process, or torchrun on
# one node). The caller sets ROOT (the repository root) first. Paths a user gives (the config, data,
# output_dir, checkpoints) are taken relative to the directory the wrapper is called from, as with
# `python -m pretrain` itself: the wrappers never change directory.

# parse_launch_args "$@": sets CONFIG (the first argument unless it is a key=value or an option, or
# --config FILE as python -m takes it; empty when absent), NPROC (--nproc N / --nproc=N, default 1), HELP (1 for -h / --help) and ARGS
# (everything else, passed on to python -m MODULE).
parse_launch_args() {
  CONFIG=""
  if [[ $# -gt 0 && $1 != *=* && $1 != -* ]]; then CONFIG=$1; shift; fi
  NPROC=1
  HELP=0
  ARGS=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --nproc) NPROC=${2:?--nproc needs a number of processes}; shift 2 ;;
      --nproc=*) NPROC=${1#--nproc=}; shift ;;
      --config) CONFIG=${2:?--config needs a file}; shift 2 ;;
      --config=*) CONFIG=${1#--config=}; shift ;;
      -h|--help) HELP=1; shift ;;
      *) ARGS+=("$1"); shift ;;
    esac
  done
  if ! [[ $NPROC =~ ^[1-9][0-9]*$ ]]; then
    echo "error: --nproc must be a positive number of processes, got '$NPROC'" >&2
    exit 2
  fi
}

# show_help SCRIPT MODULE: the wrapper's own usage (its header comment), then the module's --help
# when the toolkit is installed; nothing is set up or run.
show_help() {
  sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$1"
  echo
  if [[ -x $ROOT/.venv/bin/python ]]; then
    "$ROOT/.venv/bin/python" -m "$2" --help
  else
    echo "(not set up yet: tools/setup.sh installs it; then python -m $2 --help lists the config sections."
    echo " Every key with its default and meaning: $ROOT/docs/config.md)"
  fi
}

# launch_module MODULE: set up (idempotent), then python -m MODULE --config CONFIG ARGS..., under
# torchrun when NPROC > 1.
launch_module() {
  bash "$ROOT/tools/setup.sh" ${ET_SETUP_ARGS:-}
  if [[ $NPROC -gt 1 ]]; then
    # torchrun reports a failed rank with its own summary and exit code 1: check the config (and the
    # overrides) once first, so that a mistake there ends with exit 2 and the message alone
    "$ROOT/.venv/bin/python" -m "$1" --config "$CONFIG" "${ARGS[@]+"${ARGS[@]}"}" --print-config >/dev/null || exit $?
    # engine.launch: torchrun without its traceback when a signal stops the run (exit 130 / 143)
    exec "$ROOT/.venv/bin/python" -m engine.launch --standalone --nproc_per_node "$NPROC" -m "$1" --config "$CONFIG" "${ARGS[@]+"${ARGS[@]}"}"
  fi
  exec "$ROOT/.venv/bin/python" -m "$1" --config "$CONFIG" "${ARGS[@]+"${ARGS[@]}"}"
}
