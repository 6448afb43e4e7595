"""DPOConfig: every knob of a `fastppo dpo` run, in one typed dataclass, validated in one place.

The same conventions as PPOConfig (config.py): field names are the Python API and the YAML keys, `validate()`
checks types, choices, ranges and paths before any model is loaded, and every error is an `InputError` naming
the field.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass

from fastppo.ppo.config import _check_path, _check_type, _f
from fastppo.runtime.errors import InputError
from fastppo.runtime.precision import PRECISIONS

DPO_LOSSES = ("sigmoid", "ipo", "label_smoothing")


@dataclass
class DPOConfig:
    # --- models -----------------------------------------------------------------------------------------------
    model: typing.Any = _f(
        None, "Causal LM to train (a checkpoint directory, usually the SFT model); also the frozen reference."
    )
    tokenizer: str | None = _f(None, "Tokenizer path; defaults to model.")
    reference_quantization: str = _f("none", "Load the reference copy 'none', '8bit' or '4bit' (NF4, bitsandbytes).")
    lora_rank: int = _f(0, "LoRA rank; 0 trains every weight. With LoRA the reference is the adapters-off model.")
    lora_alpha: float = _f(16.0, "LoRA scaling numerator (effective scale lora_alpha / lora_rank).")
    save_merged_lora: bool = _f(True, "Save LoRA merged into the weights (True) or as an adapter (False).")
    fused_logprobs: bool = _f(True, "Compute log-probs from hidden states without materializing the logits.")
    device: str = _f("auto", "'auto' (CUDA if present), 'cpu' or 'cuda'.")
    precision: str = _f(
        "auto",
        "What the models compute in: 'bf16' (autocast; weights, optimizer and losses stay float32), 'float32', or "
        "'auto': bf16 on CUDA, float32 on a CPU (bf16 pays only on CPUs with AMX / AVX-512 BF16: `fastppo doctor`).",
    )
    # --- data -------------------------------------------------------------------------------------------------
    data: typing.Any = _f(None, 'JSONL of {"prompt", "chosen", "rejected"} lines, or a list of such dicts.')
    max_length: int = _f(
        512,
        "Tokens of prompt + response; longer responses are cut at the end (pairs whose prompt fills it are dropped).",
    )
    eval_fraction: float = _f(0.1, "Pairs held out for the eval/ metrics; their prompts are the KL prompts.")
    # --- the loss ---------------------------------------------------------------------------------------------
    loss: str = _f(
        "sigmoid",
        "'sigmoid' (DPO), 'ipo' (Azar et al. 2023; on length-averaged log-probs, as TRL) "
        "or 'label_smoothing' (conservative DPO).",
    )
    beta: float = _f(
        0.1,
        "Implicit KL strength: reward = beta * log(policy / reference). IPO's tau. > 0; 0.1 is the paper's default.",
    )
    label_smoothing: float = _f(
        0.0, "For loss 'label_smoothing': the assumed probability that a label is flipped, in (0, 0.5)."
    )
    # --- optimization -----------------------------------------------------------------------------------------
    learning_rate: float = _f(1e-6, "AdamW peak learning rate (5% warmup, then linear decay); the paper's 1e-6.")
    epochs: float = _f(1.0, "Passes over the training pairs (fractions allowed).")
    batch_size: int = _f(16, "Pairs per optimizer step (chosen and rejected go through one forward: 2x rows).")
    # --- evaluation, run --------------------------------------------------------------------------------------
    eval_every: int = _f(10, "Steps between evaluations (held-out loss/accuracy/margin, sampled KL); 0 = at the end.")
    kl_samples: int = _f(
        32,
        "Responses sampled from the policy on held-out prompts per evaluation to estimate "
        "KL(policy || reference) per sequence; 0 = no KL estimate.",
    )
    max_new_tokens: int = _f(64, "Length limit of those sampled responses, in tokens.")
    output_dir: str = _f("runs/dpo", "Run directory: metrics.jsonl, TensorBoard logs, checkpoints.")
    seed: int = _f(0, "Seed of the split, the batch order, initialization and the evaluation's sampling.")
    save_every: int = _f(0, "Save a checkpoint every this many steps (and at the end); 0 = only at the end.")
    resume_from: str | None = _f(None, "Run directory (latest valid checkpoint) or checkpoint directory to resume.")
    overwrite_output_dir: bool = _f(False, "Allow a fresh run into an output_dir that holds checkpoints.")
    tensorboard: bool = _f(True, "Also log to TensorBoard in <output_dir>/tb.")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> DPOConfig:
        unknown = sorted(set(values) - cls.field_names())
        if unknown:
            raise InputError(f"{source}: unknown key(s) {', '.join(unknown)}")
        return cls(**values)

    def validate(self) -> DPOConfig:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), hints[f.name])
        self._check_choices()
        self._check_ranges()
        self._check_paths()
        return self

    def _check_choices(self) -> None:
        choices = {
            "loss": DPO_LOSSES,
            "reference_quantization": ("none", "8bit", "4bit"),
            "device": ("auto", "cpu", "cuda"),
            "precision": PRECISIONS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise InputError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.lora_rank > 0 and self.reference_quantization != "none":
            raise InputError(
                "reference_quantization: with LoRA (lora_rank > 0) the reference is the policy with its "
                "adapters off, not a separate copy to quantize; leave it 'none'"
            )

    def _check_ranges(self) -> None:
        # `not x > 0` rather than `x <= 0`: NaN fails every comparison and must be refused too.
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise InputError(f"beta must be a finite number > 0, got {self.beta}")
        if self.loss == "label_smoothing" and not 0 < self.label_smoothing < 0.5:
            raise InputError(
                f"label_smoothing must lie in (0, 0.5) for loss 'label_smoothing', got {self.label_smoothing}"
            )
        if self.loss != "label_smoothing" and self.label_smoothing != 0:
            raise InputError(f"label_smoothing is used by loss 'label_smoothing' only (loss is {self.loss!r})")
        for name in ("learning_rate", "epochs", "batch_size", "max_new_tokens"):
            if not getattr(self, name) > 0:
                raise InputError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("lora_rank", "eval_every", "kl_samples", "save_every"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_length < 2:
            raise InputError(f"max_length must be >= 2 (a prompt token and a response token), got {self.max_length}")
        if not 0 <= self.eval_fraction < 1:
            raise InputError(f"eval_fraction must lie in [0, 1), got {self.eval_fraction}")

    def _check_paths(self) -> None:
        if self.model is None:
            raise InputError("model: no model given (a checkpoint directory or a model)")
        if isinstance(self.model, str):
            _check_path("model", self.model)
        _check_path("tokenizer", self.tokenizer)
        if self.data is None:
            raise InputError(
                'data: no preference pairs given (a JSONL path or a list of {"prompt", "chosen", "rejected"} dicts)'
            )
        if isinstance(self.data, str):
            _check_path("data", self.data, file=True)
        elif not isinstance(self.data, list):
            raise InputError(f"data must be a JSONL path or a list of dicts, got {type(self.data).__name__}")
        _check_path("resume_from", self.resume_from)
