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
    from tests.tiny_models import save_tiny_models

    return save_tiny_models(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: a second intra-op thread only adds OpenMP contention, which on a busy
    machine makes a tiny linear layer orders of magnitude slower. The test folders of the trainer's parts use it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    from tests.tiny_models import save_tiny_models

    directory = tmp_path_factory.mktemp("models")
    return {arch: save_tiny_models(directory, arch) for arch in ("llama", "qwen2", "gpt2", "gpt_neox")}
