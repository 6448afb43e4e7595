"""Messages libraries print on fastppo's behalf: explained once, or filtered at fastppo's own call; nothing else."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from fastppo.models import add_lora, load_pretrained
from fastppo.runtime.library_messages import BITSANDBYTES_MESSAGES, explain_bitsandbytes_messages
from tests.tiny_models import save_tiny_models

CAST_LOGGER = "bitsandbytes.autograd._functions"


def messages(caplog, logger_name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger_name]


def test_an_8bit_model_says_once_why_its_inputs_are_cast(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger(CAST_LOGGER), "filters", [])  # as in a new process: not shown yet
    policy, _ = save_tiny_models(tmp_path, "llama")
    int8 = load_pretrained(AutoModelForCausalLM, policy, "8bit", torch.device("cpu"))
    ids = torch.tensor([[3, 5, 6, 7]])
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            int8(input_ids=ids)  # float32 activations into every 8-bit layer, each forward
    cast = [m for m in messages(caplog, CAST_LOGGER) if m.startswith("MatMul8bitLt")]
    assert len(cast) == 1, cast
    assert "fastppo: expected with an 8-bit reference or reward model" in cast[0]


def test_the_4bit_hub_kernel_message_is_explained_once_and_other_messages_pass(caplog, monkeypatch):
    name = "bitsandbytes.backends.cpu.ops"
    logger = logging.getLogger(name)
    monkeypatch.setattr(logger, "filters", [])  # as in a new process (importing bitsandbytes here showed it already)
    explain_bitsandbytes_messages()
    explain_bitsandbytes_messages()  # idempotent: still one filter
    assert sum(f.prefix == BITSANDBYTES_MESSAGES[name][0] for f in logger.filters) == 1
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "untrusted")
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "untrusted")
        logger.warning("something else bitsandbytes says")
        logging.getLogger(CAST_LOGGER).warning("MatMul8bitLt: other news")  # same logger, still its own message
    seen = messages(caplog, name)
    assert len(seen) == 2 and "built-in 4-bit path" in seen[0] and seen[1] == "something else bitsandbytes says"


def test_peft_wrapping_hides_only_peft_reading_a_deprecated_property(tmp_path):
    policy, _ = save_tiny_models(tmp_path, "llama")
    lm = AutoModelForCausalLM.from_pretrained(policy)
    from peft import LoraConfig, get_peft_model

    def wrap_warnings(wrap) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            wrap()
            warnings.warn("a user's own deprecation", FutureWarning, stacklevel=1)
        return [str(w.message) for w in caught]

    config = LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", task_type="CAUSAL_LM")
    unfiltered = wrap_warnings(lambda: get_peft_model(AutoModelForCausalLM.from_pretrained(policy), config))
    if not any("is_gradient_checkpointing" in m for m in unfiltered):
        pytest.skip("peft no longer reads the deprecated property: peft_wrapping can go")
    filtered = wrap_warnings(lambda: add_lora(lm, 2, 4.0))
    assert not any("is_gradient_checkpointing" in m for m in filtered), filtered
    assert "a user's own deprecation" in filtered
