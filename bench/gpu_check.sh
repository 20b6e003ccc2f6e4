#!/usr/bin/env bash
# The GPU figures of every benchmark in at most 12 minutes from a cold machine, on a bare copy of
# the working tree (nothing pip-installed, no network):
#   bash bench/gpu_check.sh                 # results: bench/results/gpu_check_<device>.json (+ .log)
#   bash bench/gpu_check.sh --dry-run       # every part, tiny shapes, CPU only (a test runs this)
#   bash bench/gpu_check.sh --out FILE --parts preflight,attention
# Each part runs in its own process under its own `timeout` and writes its figures into the JSON
# as it measures them; a part that times out keeps what it had (status "timeout"). A short table
# ends the run. The driver, and the one place the budgets are set, is bench/gpu_check.py.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

dry=0; out=""; only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --out) out="$2"; shift ;;
    --parts) only="$2"; shift ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --dry-run, --out FILE, --parts a,b)" >&2; exit 2 ;;
  esac
  shift
done

PY=${PYTHON:-python}
command -v "$PY" >/dev/null 2>&1 || PY=python3
start=$(date +%s)
dflag=""; [ $dry = 1 ] && dflag="--dry-run"
# TOTAL, SETUP, PIP_QUICK, BUILD_EXT, PARTS and BUDGET[part], in seconds
budgets=$("$PY" bench/gpu_check.py --budgets $dflag) || { echo "gpu_check.sh: could not read the budgets" >&2; exit 1; }
eval "$budgets"
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# ---- setup: make ivfast.kernels importable and build ivfast._C in place (bare tree, no network)
made_link=0
cleanup() { if [ $made_link = 1 ]; then rm -f "$ROOT/ivfast/kernels"; fi; }
trap cleanup EXIT
have() { "$PY" -c "import $1" >/dev/null 2>&1; }
if [ $dry = 0 ] && ! { have ivfast.kernels && have ivfast._C; }; then
  echo "=== setup: pip install --no-build-isolation --no-deps -e . (builds ivfast._C with cmake)"
  mkdir -p bench/results
  if ! timeout "$SETUP" "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . -q \
      > bench/results/gpu_check_setup.log 2>&1; then
    echo "=== setup: pip install failed (tail of bench/results/gpu_check_setup.log):"
    tail -n 5 bench/results/gpu_check_setup.log
    if ! have ivfast._C && [ $(( $(date +%s) - start )) -lt "$PIP_QUICK" ]; then
      # a packaging failure (not the C++ build) still lets setup.py build the extension in place
      echo "=== setup: python setup.py build_ext --inplace"
      timeout "$BUILD_EXT" "$PY" setup.py build_ext --inplace >> bench/results/gpu_check_setup.log 2>&1 \
        || echo "=== setup: build_ext failed too"
    fi
  fi
  if ! have ivfast.kernels; then
    # setup.py maps kernels/ to ivfast.kernels; without the install, a symlink does the same
    if [ ! -e ivfast/kernels ]; then ln -s ../kernels ivfast/kernels && made_link=1; fi
    echo "=== setup: ivfast.kernels mapped by symlink ivfast/kernels -> ../kernels"
  fi
  have ivfast._C || echo "=== setup: ivfast._C not built; mask sampling uses the NumPy reference (slower)"
fi

oflag=(); [ -n "$out" ] && oflag=(--out "$out")
json=$(timeout 60 "$PY" bench/gpu_check.py --init $dflag "${oflag[@]}" | tail -n 1)
if [ -z "$json" ]; then echo "gpu_check.sh: could not create the result file" >&2; exit 1; fi
log="${json%.json}.log"
: > "$log"
echo "=== results: $json (log $log)"

for part in $PARTS; do
  if [ -n "$only" ] && [[ ",$only," != *",$part,"* ]]; then continue; fi
  left=$(( TOTAL - ($(date +%s) - start) ))
  t=${BUDGET[$part]}
  [ $left -lt $t ] && t=$left
  if [ $t -lt 10 ]; then
    "$PY" bench/gpu_check.py --mark "$part" "skipped(total budget)" --out "$json"
    continue
  fi
  echo "=== $part (timeout ${t}s)" | tee -a "$log"
  # SIGTERM at the limit, SIGKILL 5 s later; the JSON already holds what the part measured
  timeout -k 5 "$t" "$PY" bench/gpu_check.py --part "$part" --budget "$t" --out "$json" $dflag >> "$log" 2>&1
  rc=$?
  if [ $rc = 124 ] || [ $rc = 137 ]; then
    "$PY" bench/gpu_check.py --mark "$part" timeout --out "$json"
    echo "=== $part: TIMEOUT after ${t}s (partial results kept)" | tee -a "$log"
  elif [ $rc != 0 ]; then
    "$PY" bench/gpu_check.py --mark "$part" error --out "$json"
    echo "=== $part: exit $rc (see $log)" | tee -a "$log"
  fi
done

echo "=== done in $(( $(date +%s) - start )) s"
"$PY" bench/gpu_check.py --table --out "$json" | tee -a "$log"
