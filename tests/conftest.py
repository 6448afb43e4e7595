import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter; this must be set before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def base_model(tmp_path) -> str:
    """A freshly initialised tiny Llama and the demo tokenizer, saved as a checkpoint directory."""
    from fastppo.demo.pipeline import build_policy
    from fastppo.demo.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    path = tmp_path / "base"
    build_policy(tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> tuple[str, str]:
    """(causal LM, 1-label classifier) directories of a tiny Llama with the trainer tests' tokenizer."""
    from tests.trainer.conftest import save_tiny_models

    return save_tiny_models(tmp_path_factory.mktemp("tiny-llama"), "llama")
