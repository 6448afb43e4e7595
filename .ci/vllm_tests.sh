#!/usr/bin/env bash
# The vLLM engine's tests (tests/engines/vllm) in their own environment: builds .venv-vllm if needed (.ci/vllm_env.sh), then
# runs them, and the tests that load, train and save transformers models, at the lower bounds of transformers and
# torch that this environment pins; exits non-zero on any failure. Called by .ci/run after the main suite;
# FASTPPO_SKIP_VLLM_TESTS=1 skips.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${FASTPPO_SKIP_VLLM_TESTS:-0}" == 1 ]]; then
    echo "tests/engines/vllm: skipped (FASTPPO_SKIP_VLLM_TESTS=1)"
    exit 0
fi
.ci/vllm_env.sh
ENV=${FASTPPO_VLLM_ENV:-.venv-vllm}
# One thread each: the tiny models gain nothing from more, and the CI machine is shared.
OMP_NUM_THREADS=1 "$ENV/bin/python" -m pytest -q -p no:cacheprovider tests/engines/vllm tests/ppo/test_correction.py \
    tests/test_models.py tests/ppo/test_real_checkpoints.py tests/ppo/test_trainer.py \
    tests/ppo/test_batch.py tests/stages/test_sft.py tests/stages/test_reward_model.py tests/stages/test_dpo.py \
    tests/engines/test_hf.py tests/engines/test_lean_decode.py tests/test_packing.py tests/runtime/test_precision.py \
    tests/ppo/test_precision_gap.py tests/test_packaging.py "$@"
