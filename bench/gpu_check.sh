#!/usr/bin/env bash
# Everything fedloom checks on a GPU machine, in one command (about 8 minutes on an H200):
#   bench/gpu_check.sh                  the CUDA tests (pytest -m gpu), then bench/gpu.py --rounds $ROUNDS
#   bench/gpu_check.sh --fetch-wheels   on a machine with pip access: fetch the wheels of fedloom's
#                                       dependencies that a bare CUDA image lacks into bench/.wheels/
# Results go to $OUT when it is set (else bench/results): gpu.json, gpu.md, gpu-*.png, gpu_tests.txt,
# gpu_bench.txt and gpu_logs.tar.gz (every contestant's log). Environment: PYTHON (default python3, the
# interpreter with a CUDA torch), ROUNDS (8), BUDGET (seconds for bench/gpu.py, 390).
# fedloom runs from this checkout (no install) on whatever torch PYTHON has. Its own pure-Python
# dependencies come from bench/.wheels/ when PYTHON lacks them (a machine without the internet).
# Flower needs PyPI for its CUDA venv: where PyPI cannot be reached it is left out, and gpu.md says so.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=bench/.wheels
# fedloom's imports that are not in a CUDA/PyTorch image (its numpy, scipy, torch, rich, yaml... are)
NEEDED=(pydantic pydantic-core annotated-types typing-inspection tomli-w dp-accounting)

if [ "${1:-}" = "--fetch-wheels" ]; then
    # the versions this interpreter has, as wheels for CPython 3.12 on Linux x86-64 (the GPU image's)
    specs=()
    for name in "${NEEDED[@]}"; do
        specs+=("$name==$("$PY" -c "import importlib.metadata as m; print(m.version('$name'))")") || exit 1
    done
    exec "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" "${specs[@]}"
fi

OUT_DIR=${OUT:-bench/results}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import fedloom.runner" 2>/dev/null && compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/fedloom-site "$WHEELS"/*.whl \
        || { echo "error: $WHEELS/ does not install with $PY (--fetch-wheels fetches CPython 3.12's)" >&2; exit 2; }
    export PYTHONPATH="$PYTHONPATH:/tmp/fedloom-site"
fi
if ! missing=$("$PY" -c "import fedloom.runner" 2>&1); then
    echo "error: fedloom does not import with $PY: ${missing##*$'\n'}" >&2
    echo "  install its dependencies (pip install -e .), or run bench/gpu_check.sh --fetch-wheels on a machine" >&2
    echo "  with pip access and bring $WHEELS/ along" >&2
    exit 2
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: $PY's torch ($("$PY" -c 'import torch; print(torch.__version__)')) sees no CUDA device;" \
         "bench/gpu_check.sh is for a GPU machine (bench/gpu.py --allow-cpu smoke-tests on a CPU)" >&2
    exit 2
fi

"$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT_DIR/gpu_tests.txt"
tests=${PIPESTATUS[0]}
PYTHONUNBUFFERED=1 "$PY" bench/gpu.py --rounds "${ROUNDS:-8}" --budget "${BUDGET:-390}" --out "$OUT_DIR" 2>&1 \
    | tee "$OUT_DIR/gpu_bench.txt"
bench=${PIPESTATUS[0]}
tar czf "$OUT_DIR/gpu_logs.tar.gz" -C bench/.cache logs 2>/dev/null
echo "gpu_check: tests exit $tests, bench/gpu.py exit $bench; results in $OUT_DIR" >&2
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
