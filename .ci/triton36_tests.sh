#!/usr/bin/env bash
# The lent GPU machine's Triton (3.6.0, docs/gpu.md) compiles every kernel: tests/ops/test_triton_compile.py once more,
# with triton 3.6.0 put in front of the main env's newer one (PYTHONPATH), so that the first GPU call does not die on
# an API difference. It compiles each kernel as its launcher launches it, for sm_80 and sm_90, through 3.6's own
# compiler and ptxas: what a GPU runs. (The interpreter tests are not rerun under 3.6: a GPU never interprets, and
# 3.6's interpreter cannot run under the numpy 2.4 of the main env.) Called by .ci/run after the main suite;
# FASTPPO_SKIP_TRITON36_TESTS=1 skips. The overlay (.ci-triton36/, ~640 MB, a 188 MB wheel) is installed once.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${FASTPPO_SKIP_TRITON36_TESTS:-0}" == 1 ]]; then
    echo "triton 3.6 compile: skipped (FASTPPO_SKIP_TRITON36_TESTS=1)"
    exit 0
fi
VERSION=3.6.0
DIR=${FASTPPO_TRITON36_DIR:-.ci-triton36}
if [[ ! -f "$DIR/.fastppo-ready" ]]; then
    rm -rf "$DIR"
    # Triton alone (--no-deps): torch and the rest come from the main env, whose python runs the test.
    PIP_NO_CACHE_DIR=1 python -m pip install -q --no-deps --target "$DIR" "triton==$VERSION"
    touch "$DIR/.fastppo-ready"
fi
export PYTHONPATH="$(cd "$DIR" && pwd)${PYTHONPATH:+:$PYTHONPATH}"
python -c "import sys, triton; v = triton.__version__; print('triton', v, triton.__file__); sys.exit(v != '$VERSION')"
OMP_NUM_THREADS=1 python -m pytest -q -p no:cacheprovider tests/ops/test_triton_compile.py "$@"
