"""DPOConfig: every knob of a `fastppo dpo` run, in one typed dataclass, validated in one place.

The conventions of every stage's config (`fastppo.runtime.config_base`): field names are the Python API, the YAML
keys and the flags of `fastppo dpo`; `validate()` checks types, choices, ranges and paths before any model is
loaded, and every error is an `InputError` naming the field.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

from fastppo.runtime.config_base import RESUME_FROM_HELP, Config, check_path, check_resume_from, option
from fastppo.runtime.errors import InputError
from fastppo.runtime.model_sources import is_model_source
from fastppo.runtime.precision import PRECISION_HELP, PRECISIONS
from fastppo.runtime.validation import NON_NEGATIVE, POSITIVE, Interval

DPO_LOSSES = ("sigmoid", "ipo", "label_smoothing")


@dataclass
class DPOConfig(Config):
    # --- models -----------------------------------------------------------------------------------------------
    model: typing.Any = option(
        None, "Causal LM to train (a checkpoint directory, usually the SFT model); also the frozen reference."
    )
    tokenizer: str | None = option(None, "Tokenizer path; defaults to model.")
    reference_quantization: str = option(
        "none", "Load the reference copy 'none', '8bit' or '4bit' (NF4, bitsandbytes)."
    )
    lora_rank: int = option(0, "LoRA rank; 0 trains every weight. With LoRA the reference is the adapters-off model.")
    lora_alpha: float = option(16.0, "LoRA scaling numerator (effective scale lora_alpha / lora_rank).")
    save_merged_lora: bool = option(True, "Save LoRA merged into the weights (True) or as an adapter (False).")
    fused_logprobs: bool = option(True, "Compute log-probs from hidden states without materializing the logits.")
    device: str = option("auto", "'auto' (CUDA if present), 'cpu' or 'cuda'.")
    precision: str = option("auto", PRECISION_HELP)
    # --- data -------------------------------------------------------------------------------------------------
    data: typing.Any = option(None, 'JSONL of {"prompt", "chosen", "rejected"} lines, or a list of such dicts.')
    max_length: int = option(
        512,
        "Tokens of prompt + response; longer responses are cut at the end (pairs whose prompt fills it are dropped).",
    )
    eval_fraction: float = option(0.1, "Pairs held out for the eval/ metrics; their prompts are the KL prompts.")
    # --- the loss ---------------------------------------------------------------------------------------------
    loss: str = option(
        "sigmoid",
        "'sigmoid' (DPO), 'ipo' (Azar et al. 2023; on length-averaged log-probs, as TRL) "
        "or 'label_smoothing' (conservative DPO).",
    )
    beta: float = option(
        0.1,
        "Implicit KL strength: reward = beta * log(policy / reference). IPO's tau. > 0; 0.1 is the paper's default.",
    )
    label_smoothing: float = option(
        0.0, "For loss 'label_smoothing': the assumed probability that a label is flipped, in (0, 0.5)."
    )
    # --- optimization -----------------------------------------------------------------------------------------
    learning_rate: float = option(
        1e-6, "AdamW peak learning rate (5% warmup, then linear decay); the paper's 1e-6.", aliases=("--lr",)
    )
    epochs: float = option(1.0, "Passes over the training pairs (fractions allowed).")
    batch_size: int = option(16, "Pairs per optimizer step (chosen and rejected go through one forward: 2x rows).")
    micro_batch_size: int | None = option(
        None, "Pairs per forward/backward (gradient accumulation, by length); None: batch_size."
    )
    micro_batch_tokens: int | None = option(
        None, "Tokens per forward/backward (pairs x the longest prompt + answer), micro_batch_size pairs at most."
    )
    # --- evaluation, run --------------------------------------------------------------------------------------
    eval_every: int = option(
        10, "Steps between evaluations (held-out loss/accuracy/margin, sampled KL); 0 = at the end."
    )
    kl_samples: int = option(
        32,
        "Responses sampled from the policy on held-out prompts per evaluation to estimate "
        "KL(policy || reference) per sequence; 0 = no KL estimate.",
    )
    max_new_tokens: int = option(64, "Length limit of those sampled responses, in tokens.")
    output_dir: str = option("runs/dpo", "Run directory: metrics.jsonl, TensorBoard logs, checkpoints.")
    seed: int = option(0, "Seed of the split, the batch order, initialization and the evaluation's sampling.")
    save_every: int = option(0, "Save a checkpoint every this many steps (and at the end); 0 = only at the end.")
    resume_from: str | None = option(None, RESUME_FROM_HELP)
    overwrite_output_dir: bool = option(False, "Allow a fresh run into an output_dir that holds checkpoints.")
    tensorboard: bool = option(True, "Also log to TensorBoard in <output_dir>/tb.")

    CHOICES = {
        "loss": DPO_LOSSES,
        "reference_quantization": ("none", "8bit", "4bit"),
        "device": ("auto", "cpu", "cuda"),
        "precision": PRECISIONS,
    }
    RANGES = {
        "beta": POSITIVE,
        "learning_rate": POSITIVE,
        "epochs": POSITIVE,
        "batch_size": POSITIVE,
        "micro_batch_size": POSITIVE,
        "micro_batch_tokens": POSITIVE,
        "max_new_tokens": POSITIVE,
        "lora_rank": NON_NEGATIVE,
        "lora_alpha": POSITIVE,
        "eval_every": NON_NEGATIVE,
        "kl_samples": NON_NEGATIVE,
        "save_every": NON_NEGATIVE,
        "seed": NON_NEGATIVE,
        "max_length": Interval(2),
        "eval_fraction": Interval(0, 1, high_open=True),
        "label_smoothing": Interval(0, 0.5, high_open=True),
    }
    FOREIGN = {
        "model_name_or_path": "use model",
        "ref_model": "the reference is a frozen copy of model (or model with LoRA off)",
        "num_train_epochs": "use epochs",
        "per_device_train_batch_size": "use batch_size (pairs per optimizer step) and micro_batch_size (per forward)",
        "loss_type": "use loss",
    }

    def validate(self) -> DPOConfig:
        self.check_fields()  # types, CHOICES, RANGES
        self._check_combinations()
        self._check_paths()
        return self

    def _check_combinations(self) -> None:
        if self.lora_rank > 0 and self.reference_quantization != "none":
            raise InputError(
                "reference_quantization: with LoRA (lora_rank > 0) the reference is the policy with its "
                "adapters off, not a separate copy to quantize; leave it 'none'"
            )
        if self.loss == "label_smoothing" and not self.label_smoothing > 0:
            raise InputError(
                f"label_smoothing must lie in (0, 0.5) for loss 'label_smoothing', got {self.label_smoothing}"
            )
        if self.loss != "label_smoothing" and self.label_smoothing != 0:
            raise InputError(f"label_smoothing is used by loss 'label_smoothing' only (loss is {self.loss!r})")

    def _check_paths(self) -> None:
        if self.model is None:
            raise InputError("model: no model given (a checkpoint directory or a model)")
        if isinstance(self.model, str) and not is_model_source(self.model):
            check_path("model", self.model)
        check_path("tokenizer", self.tokenizer)
        if self.data is None:
            raise InputError(
                'data: no preference pairs given (a JSONL path or a list of {"prompt", "chosen", "rejected"} dicts)'
            )
        if isinstance(self.data, str):
            check_path("data", self.data, file=True)
        elif not isinstance(self.data, list):
            raise InputError(f"data must be a JSONL path or a list of dicts, got {type(self.data).__name__}")
        check_resume_from(self.resume_from, self.output_dir)
