#!/usr/bin/env bash
# The vLLM engine's tests (tests/vllm) in their own environment: builds .venv-vllm if needed (.ci/vllm_env.sh), then
# runs them, and the tests that load, train and save transformers models, at the lower bounds of transformers and
# torch that this environment pins; exits non-zero on any failure. Called by .ci/run after the main suite;
# FASTPPO_SKIP_VLLM_TESTS=1 skips.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${FASTPPO_SKIP_VLLM_TESTS:-0}" == 1 ]]; then
    echo "tests/vllm: skipped (FASTPPO_SKIP_VLLM_TESTS=1)"
    exit 0
fi
.ci/vllm_env.sh
ENV=${FASTPPO_VLLM_ENV:-.venv-vllm}
# One thread each: the tiny models gain nothing from more, and the CI machine is shared.
OMP_NUM_THREADS=1 "$ENV/bin/python" -m pytest -q -p no:cacheprovider tests/vllm tests/trainer/test_rollout_correction.py \
    tests/trainer/test_models.py tests/trainer/test_real_checkpoints.py tests/trainer/test_trainer.py \
    tests/test_sft.py tests/test_reward_training.py tests/test_dpo.py tests/test_packaging.py "$@"
