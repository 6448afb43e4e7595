"""Messages other libraries print because of what fastppo asks of them, and that carry nothing for a fastppo user.

Each is shown once with what it means, or filtered around the one call of fastppo's that causes it. Everything else
those libraries say, and a user's own warnings, pass untouched: the filters match one logger (or one call) and one
message each.

    bitsandbytes  "MatMul8bitLt: inputs will be cast from torch.float32 to float16 during quantization", on every
                  forward of an 8-bit model: fastppo's frozen models compute in float32, and LLM.int8 quantizes
                  each layer's input through float16. Expected; shown once, explained.
    bitsandbytes  "Failed to load CPU gemm_4bit_forward from kernels-community", when bitsandbytes is imported on a
                  CPU with AVX512-BF16: its faster 4-bit CPU kernel is code fetched from the Hugging Face hub, which
                  Hugging Face's `kernels` will not load untrusted (nor offline). Its built-in 4-bit path runs
                  instead, with the same results. Shown once, explained.
    transformers  "`is_gradient_checkpointing` is deprecated", a FutureWarning peft raises by reading that property
                  while fastppo wraps the policy in LoRA adapters: filtered around that call only.
"""

from __future__ import annotations

import contextlib
import logging
import warnings


class ExplainOnce(logging.Filter):
    """Passes the first record of one logger whose message starts with `prefix`, with `meaning` added, and drops
    the repeats; other records pass unchanged."""

    def __init__(self, prefix: str, meaning: str):
        super().__init__()
        self.prefix, self.meaning, self.shown = prefix, meaning, False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(self.prefix):
            return True
        if self.shown:
            return False
        self.shown = True
        record.msg, record.args = f"{message}\n  fastppo: {self.meaning} (shown once)", None
        return True


BITSANDBYTES_MESSAGES = {
    "bitsandbytes.autograd._functions": (
        "MatMul8bitLt: inputs will be cast",
        "expected with an 8-bit reference or reward model: fastppo computes in float32 and bitsandbytes' LLM.int8 "
        "quantizes each layer's input through float16",
    ),
    "bitsandbytes.backends.cpu.ops": (
        "Failed to load CPU gemm_4bit_forward",
        "bitsandbytes' faster 4-bit CPU kernel is code from the Hugging Face hub, which is not loaded untrusted or "
        "offline; its built-in 4-bit path runs instead, with the same results",
    ),
}


def explain_bitsandbytes_messages() -> None:
    """Install the bitsandbytes filters; call before bitsandbytes is imported (one of its messages comes at import).
    Idempotent."""
    for logger_name, (prefix, meaning) in BITSANDBYTES_MESSAGES.items():
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, ExplainOnce) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(ExplainOnce(prefix, meaning))


@contextlib.contextmanager
def peft_wrapping():
    """Around fastppo's own `get_peft_model` call: peft reads transformers' deprecated `is_gradient_checkpointing`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
