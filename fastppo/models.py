"""The models of a PPO run: the policy with its value head, the frozen reference, and how they are loaded.

`PolicyValueModel` puts the LM head and a scalar value head on the same final hidden states of one transformer
backbone, so a single forward pass gives the response's log-probs, entropies and values. Works with any
`AutoModelForCausalLM` (Llama, Qwen2, GPT-2, GPT-NeoX, ...): the backbone is `getattr(lm, lm.base_model_prefix)`
and the head is `lm.get_output_embeddings()`.

Sequences are [prompt (P tokens, left-padded) | response (T tokens, right-padded)]. The hidden state at position
P - 1 + t predicts response token t and is the state whose value V(s_t) the critic estimates.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from fastppo import ops
from fastppo.errors import InputError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device: 'cuda' was asked for but no CUDA device is available")
    return torch.device(name)


def load_tokenizer(spec):
    """A tokenizer from a path (or the object itself), with a pad token: the EOS token when it has none."""
    if isinstance(spec, str):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(spec)
            if _saved_as_generic_fast_tokenizer(spec) and tokenizer.__class__.__name__ not in _GENERIC_FAST:
                # transformers 5 maps some model types (qwen2) to their own tokenizer class even when the files
                # hold a plain tokenizers.json tokenizer; that class then mis-tokenizes it. Load it as saved.
                from transformers import PreTrainedTokenizerFast

                tokenizer = PreTrainedTokenizerFast.from_pretrained(spec)
        except (OSError, ValueError) as error:
            raise InputError(f"cannot load a tokenizer from {spec}: {error}") from None
    else:
        tokenizer = spec
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise InputError("the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


_GENERIC_FAST = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _saved_as_generic_fast_tokenizer(path: str) -> bool:
    import json
    import os

    config = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(config):
        return False
    with open(config) as f:
        return json.load(f).get("tokenizer_class") in _GENERIC_FAST


def quantization_config(quantization: str):
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def load_pretrained(auto_class, path: str, quantization: str, device: torch.device):
    kwargs = {}
    if quantization != "none":
        kwargs = {"quantization_config": quantization_config(quantization), "device_map": {"": str(device)}}
    try:
        model = auto_class.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot load a model from {path}: {error}") from None
    return model if quantization != "none" else model.to(device)


def disable_dropout(model: nn.Module) -> None:
    """PPO compares log-probs of two forward passes; dropout would make them differ for no reason."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def unwrap(lm):
    """The transformers model inside a peft wrapper (LoRA layers already injected into it)."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def backbone_of(lm) -> nn.Module:
    model = unwrap(lm)
    return getattr(model, model.base_model_prefix)


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def final_hidden(backbone: nn.Module, input_ids, attention_mask) -> torch.Tensor:
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_for(attention_mask))
    return out.last_hidden_state  # (B, L, H)


def response_logprobs(lm, hidden, response_ids, temperature: float, fused: bool):
    """(logprobs, entropy), each (B, T) float32, of the response tokens from the hidden states that predict them."""
    head = unwrap(lm).get_output_embeddings()
    softcap = getattr(unwrap(lm).config, "final_logit_softcapping", None)
    if fused and softcap is None:
        return ops.linear_token_logprobs(hidden, head.weight, response_ids, temperature, head.bias, with_entropy=True)
    logits = head(hidden)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return ops.token_logprobs_and_entropy(logits, response_ids, temperature)


class PolicyValueModel(nn.Module):
    """The policy LM plus a value head; `critic='shared'` reads values off the policy's own backbone, 'separate'
    off a copy of it, and 'none' (the critic-free estimators) builds no value head at all."""

    def __init__(self, lm, critic: str = "shared", fused_logprobs: bool = True):
        super().__init__()
        self.lm = lm
        self.critic = critic
        self.fused_logprobs = fused_logprobs
        self.value_head = self.critic_backbone = None
        if critic != "none":
            hidden_size = unwrap(lm).get_output_embeddings().weight.shape[1]
            self.value_head = nn.Linear(hidden_size, 1)
            nn.init.normal_(self.value_head.weight, std=1.0 / (hidden_size + 1) ** 0.5)
            nn.init.zeros_(self.value_head.bias)
            # A separate critic is a full copy of the initial backbone, trained only through the value loss.
            self.critic_backbone = copy.deepcopy(backbone_of(lm)) if critic == "separate" else None
            self.value_head.to(next(lm.parameters()).device)

    def forward(self, input_ids, attention_mask, prompt_length: int, temperature: float):
        """(logprobs, entropy, values), each (B, T) float32 (values None without a critic), for the response part
        input_ids[:, prompt_length:]."""
        response_ids = input_ids[:, prompt_length:]
        T = response_ids.shape[1]
        hidden = final_hidden(backbone_of(self.lm), input_ids, attention_mask)[:, prompt_length - 1 : -1]  # (B, T, H)
        logprobs, entropy = response_logprobs(self.lm, hidden, response_ids, temperature, self.fused_logprobs)
        if self.value_head is None:
            return logprobs, entropy, None
        if self.critic_backbone is not None:
            hidden = final_hidden(self.critic_backbone, input_ids, attention_mask)[:, prompt_length - 1 : -1]
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        assert values.shape[1] == T
        return logprobs, entropy, values

    def critic_parameters(self) -> list[nn.Parameter]:
        """What only the value loss trains: the value head, and a separate critic's backbone."""
        modules = [m for m in (self.value_head, self.critic_backbone) if m is not None]
        return [p for m in modules for p in m.parameters()]

    @contextlib.contextmanager
    def adapters_disabled(self):
        """The LoRA policy with its adapters off: the reference model, at no extra memory."""
        with self.lm.disable_adapter():
            yield self.lm


@torch.no_grad()
def reference_logprobs(reference_lm, input_ids, attention_mask, prompt_length: int, temperature: float, fused: bool):
    """(B, T) float32 log-probs of the response under a frozen reference LM."""
    hidden = final_hidden(backbone_of(reference_lm), input_ids, attention_mask)[:, prompt_length - 1 : -1]
    return response_logprobs(reference_lm, hidden, input_ids[:, prompt_length:], temperature, fused)[0]


def add_lora(lm, rank: int, alpha: float):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(lm, config)
