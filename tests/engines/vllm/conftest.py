"""The vLLM engine's tests: they run only where vLLM imports (.venv-vllm, built by .ci/vllm_env.sh) and skip
elsewhere. One engine per test module (a start-up is seconds), on a tiny Llama whose head size vLLM's CPU attention
supports (32)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fastppo.engines import vllm as vllm_engine

vllm_engine._set_in_process_defaults()  # before anything imports vllm
HAVE_VLLM = importlib.util.find_spec("vllm") is not None
requires_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed here: run .ci/vllm_tests.sh")


@pytest.fixture(scope="session")
def vllm_policy(tmp_path_factory) -> tuple[str, str]:
    """(policy, reward) paths of a tiny Llama: hidden 128 over 4 heads (head size 32), 2 layers, fp32 on disk so
    the engine and the trainer start from the very same weights."""
    from tests.tiny_models import save_tiny_models

    policy, reward = save_tiny_models(tmp_path_factory.mktemp("vllm-models"), "llama", hidden=128)
    return policy, reward


def load_lm(path: str):
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    lm.eval()
    return lm
