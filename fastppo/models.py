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
import json
import os

import torch
from torch import nn

from fastppo import ops
from fastppo.packing import packed_hidden
from fastppo.runtime.checkpoint import PAD_SET_BY_FASTPPO, RELEASED_DROPOUT, save_weights
from fastppo.runtime.errors import InputError
from fastppo.runtime.library_messages import explain_bitsandbytes_messages, peft_wrapping
from fastppo.runtime.validation import LOAD_ERRORS, clip, read_model_config, refuse_adapter_dir


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device: 'cuda' was asked for but no CUDA device is available")
    return torch.device(name)


def load_tokenizer(spec, need_eos: bool = False):
    """A tokenizer from a path (or the object itself), with a pad token: the EOS token when it has none. `need_eos`
    refuses one without EOS (the supervised stages train every response to end with it)."""
    if isinstance(spec, str):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=False)
            if _saved_as_generic_fast_tokenizer(spec) and tokenizer.__class__.__name__ not in _GENERIC_FAST:
                # transformers 5 maps some model types (qwen2) to their own tokenizer class even when the files
                # hold a plain tokenizers.json tokenizer; that class then mis-tokenizes it. Load it as saved.
                from transformers import PreTrainedTokenizerFast

                tokenizer = PreTrainedTokenizerFast.from_pretrained(spec)
        except LOAD_ERRORS as error:
            raise load_error(spec, error, "a tokenizer") from None
    else:
        tokenizer = spec
    if need_eos and tokenizer.eos_token_id is None:
        where = spec if isinstance(spec, str) else "tokenizer"
        raise InputError(f"{where}: the tokenizer has no eos token, so a response's end cannot be learned")
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise InputError("the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
        setattr(tokenizer, PAD_SET_BY_FASTPPO, True)  # for batching only: saved without it (`save_tokenizer`)
    return tokenizer


_GENERIC_FAST = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _saved_as_generic_fast_tokenizer(path: str) -> bool:
    config = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(config):
        return False
    with open(config) as f:
        return json.load(f).get("tokenizer_class") in _GENERIC_FAST


def require_local(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise InputError(f"{path}: no such {what} directory (models are local: a checkpoint or a config.json)")


def has_weights(path: str) -> bool:
    return os.path.isdir(path) and any(name.endswith((".safetensors", ".bin")) for name in os.listdir(path))


def load_model(path: str, auto_class, **kwargs):
    """`auto_class` from a checkpoint directory, or freshly initialised when the directory holds only a config."""
    from transformers import AutoConfig

    require_local(path, "model")
    try:
        if has_weights(path):
            return auto_class.from_pretrained(path, trust_remote_code=False, **kwargs)
        config = AutoConfig.from_pretrained(path, trust_remote_code=False, **kwargs)
        return auto_class.from_config(config)
    except LOAD_ERRORS as error:
        raise load_error(path, error) from None


def quantization_config(quantization: str):
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    explain_bitsandbytes_messages()  # before bitsandbytes is imported: one of its messages comes at import

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def load_pretrained(auto_class, path: str, quantization: str, device: torch.device, dtype=None):
    """`auto_class.from_pretrained(path)` on `device`; `dtype` None keeps the checkpoint's own dtype. A directory
    whose weights do not fill `auto_class` (another model class: a random head) is refused (`refuse_random_weights`),
    so is a LoRA adapter's."""
    refuse_adapter_dir("model", path)
    kwargs = {"dtype": dtype if dtype is not None else "auto"}
    if quantization != "none":
        kwargs.update(quantization_config=quantization_config(quantization), device_map={"": str(device)})
    try:
        model, loading = auto_class.from_pretrained(path, output_loading_info=True, trust_remote_code=False, **kwargs)
    except LOAD_ERRORS as error:
        raise load_error(path, error) from None
    refuse_random_weights(path, auto_class, loading)
    return model if quantization != "none" else model.to(device)


def load_error(path: str, error: Exception, what: str = "a model") -> InputError:
    """What failed to load from `path`, as an InputError. fastppo runs no Python code from a model directory
    (transformers' trust_remote_code, always False here): said plainly, not as an option to pass."""
    if "trust_remote_code" in str(error):
        return InputError(
            f"{path} needs its own Python code to load (auto_map in its config; transformers' trust_remote_code), "
            "and fastppo runs no code from a model directory: it has no trust_remote_code option. Use a checkpoint "
            "of an architecture transformers ships, or convert this one to it"
        )
    return InputError(f"cannot load {what} from {path}: {clip(error)}")


def refuse_random_weights(path: str, auto_class, loading: dict) -> None:
    """Weights `auto_class` has that the directory lacks are initialized at random by transformers (with a warning
    in a log): a sequence classifier's directory as a causal LM trains a random `lm_head`, a causal LM's as a reward
    model scores with a random `score` head. Tied weights (an LM head sharing the embeddings) are not missing."""
    initialized = sorted(loading.get("missing_keys") or ())
    if not initialized:
        return
    architectures = read_model_config("model", path).get("architectures") or ["an unnamed architecture"]
    listed = ", ".join(initialized[:4]) + (f" and {len(initialized) - 4} more" if len(initialized) > 4 else "")
    if "CausalLM" in auto_class.__name__:
        wanted, fix = "a causal LM", "give the causal LM checkpoint (the SFT model, ...ForCausalLM)"
    else:
        wanted, fix = (
            "a 1-label sequence classifier (a reward model)",
            f"train a reward model from it first (fastppo reward-model --model {path}), or give a "
            "'module:function' reward",
        )
    raise InputError(
        f"{path} holds a {'/'.join(architectures)} (config.json); loaded as {wanted}, its {listed} would be "
        f"initialized at random instead of loaded: {fix}"
    )


def load_frozen(auto_class, path: str, quantization: str, device: torch.device):
    """A frozen (reference or reward) model from `path`, dropout off: quantized, or in its checkpoint's dtype. On
    CPU, where the trainer computes in float32 (a bf16 reference would put rounding noise into the KL), a bf16/fp16
    checkpoint's matrices stay in it and are read as float32 (`compute_in_float32`)."""
    model = freeze(load_pretrained(auto_class, path, quantization, device, None))
    disable_dropout(model)
    return model if quantization != "none" or device.type == "cuda" else compute_in_float32(model)


class _ReadAsFloat32(nn.Module):
    """A parametrization: the stored weight, upcast on every read; under autocast to the weight's own dtype (bf16
    autocast over a bf16 checkpoint), the stored weight as it is, which autocast would otherwise round the upcast
    copy back to: the same product without two conversions of every weight."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        device = weight.device.type
        if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == weight.dtype:
            return weight
        return weight.float()


def compute_in_float32(model: nn.Module) -> nn.Module:
    """A frozen model that computes in float32 but keeps its bf16/fp16 matrices: each nn.Linear weight is read
    through an upcast (a parametrization: exact, one transient float32 copy per layer in use), an nn.Embedding's
    looked-up rows are upcast, every other floating tensor (norms, biases, small heads, buffers) becomes float32.
    Outputs are bitwise those of the model converted to float32, at half its memory: a released checkpoint's
    reference and reward model cost what the checkpoint does, not twice that (bench/README.md's end-to-end
    tables)."""
    from torch.nn.utils import parametrize

    half = (torch.bfloat16, torch.float16)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.dtype in half]
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding) and m.weight.dtype in half]
    kept = {id(m.weight) for m in linears + embeddings}
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point() and id(tensor) not in kept:
            tensor.data = tensor.data.float()
    for module in linears:  # a tied LM head (the embedding's matrix) stays one stored tensor
        parametrize.register_parametrization(module, "weight", _ReadAsFloat32(), unsafe=True)
    for module in embeddings:  # the looked-up rows are upcast, not the whole table
        module.register_forward_hook(lambda module, args, rows: rows.float())
    return model


def load_trainable_lm(spec, device: torch.device):
    """(the LM to train, its checkpoint's dtype) from a path or a model object: on `device` with float32 weights
    whatever the checkpoint's dtype (an AdamW update of a bf16 weight below half a ULP vanishes: at lr 1e-6 most
    weights would never move; bf16 autocast does the compute on CUDA), dropout off."""
    from transformers import AutoModelForCausalLM

    lm = load_pretrained(AutoModelForCausalLM, spec, "none", device) if isinstance(spec, str) else spec
    if getattr(lm, "is_loaded_in_8bit", False) or getattr(lm, "is_loaded_in_4bit", False):
        raise InputError("policy: a quantized model cannot be trained; pass the unquantized checkpoint")
    checkpoint_dtype = next(lm.parameters()).dtype
    lm.to(device=device, dtype=torch.float32)
    disable_dropout(lm)
    return lm, checkpoint_dtype


def frozen_reference(source, lm, quantization: str, device: torch.device, checkpoint_dtype: torch.dtype, given=None):
    """The frozen reference: `given` (a model object: quantized through a temporary checkpoint, or moved to
    `device`), else loaded from `source` when it is a path, else a copy of `lm` (the policy before any LoRA is
    added), quantized, or in `checkpoint_dtype` (read as float32 on CPU, as `load_frozen`)."""
    from transformers import AutoModelForCausalLM

    if given is not None:
        if quantization != "none":
            return quantized_copy(given, AutoModelForCausalLM, quantization, device, next(given.parameters()).dtype)
        disable_dropout(given)
        return freeze(given.to(device))
    if isinstance(source, str):
        return load_frozen(AutoModelForCausalLM, source, quantization, device)
    if quantization != "none":
        return quantized_copy(lm, AutoModelForCausalLM, quantization, device, checkpoint_dtype)
    # The policy still equals its checkpoint: its parameters go back to the checkpoint's dtype exactly (buffers
    # such as rotary frequencies stay float32, as the checkpoint's loaded model has them).
    reference = freeze(copy.deepcopy(lm))
    for p in reference.parameters():
        p.data = p.data.to(checkpoint_dtype)
    return reference if device.type == "cuda" else compute_in_float32(reference)


def quantized_copy(model, auto_class, quantization: str, device: torch.device, dtype: torch.dtype):
    """A frozen, quantized copy of an in-memory model: bitsandbytes quantizes while loading, so the weights go
    through a temporary checkpoint (saved in `dtype`, the checkpoint's own)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        save_weights(model, tmp, dtype)
        return load_frozen(auto_class, tmp, quantization, device)


# Dropout is applied functionally by most decoder models (Llama/Qwen2 `attention_dropout`, OPT `dropout`, GPT-NeoX
# `hidden_dropout`, GPT-2 `attn_pdrop`...): the probability is copied from the config into a float attribute of the
# module at construction, so neither the config nor `nn.Dropout` reaches it. Any float attribute with one of these
# names in it is a drop probability.
_DROPOUT_NAMES = ("dropout", "pdrop", "layerdrop")


def disable_dropout(model: nn.Module) -> None:
    """PPO compares log-probs of two forward passes; dropout would make them differ for no reason. Zeroes every
    drop probability: `nn.Dropout` modules (LoRA's `lora_dropout` included), functional ones held as module
    attributes, and the configs (some architectures, Falcon for one, read config.attention_dropout in their forward).
    The released values are kept on `model` (RELEASED_DROPOUT) and written back into every config.json fastppo saves
    (`save_weights`): whoever fine-tunes the result next gets the dropout the model was released with."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict") and not hasattr(model, RELEASED_DROPOUT):
        setattr(model, RELEASED_DROPOUT, _dropout_values(config.to_dict()))
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if isinstance(value, float) and _is_dropout(name):
                setattr(module, name, 0.0)
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            for name, value in config.to_dict().items():
                if isinstance(value, float) and _is_dropout(name):
                    setattr(config, name, 0.0)


def _is_dropout(name: str) -> bool:
    return any(key in name.lower() for key in _DROPOUT_NAMES)


def _dropout_values(config: dict) -> dict:
    """The drop probabilities of a config dict, nested configs (a multimodal model's text_config) included."""
    found = {}
    for name, value in config.items():
        if isinstance(value, dict):
            nested = _dropout_values(value)
            if nested:
                found[name] = nested
        elif isinstance(value, float) and _is_dropout(name):
            found[name] = value
    return found


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def plain_linear(module) -> bool:
    """An untouched float32 nn.Linear: LoRA and quantized layers are other classes, and a layer whose forward was
    replaced keeps its own. The decode's weight re-layouts apply to these only."""
    return type(module) is nn.Linear and module.weight.dtype == torch.float32 and "forward" not in vars(module)


def unwrap(lm):
    """The transformers model inside a peft wrapper (LoRA layers already injected into it)."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def backbone_of(lm) -> nn.Module:
    model = unwrap(lm)
    return getattr(model, model.base_model_prefix)


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def final_hidden(backbone: nn.Module, input_ids, attention_mask, packed: bool = False) -> torch.Tensor:
    """(B, L, H) the backbone's final hidden states; `packed`: computed over the real tokens only (fastppo.packing)."""
    if packed:
        return packed_hidden(backbone, input_ids, attention_mask)
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_for(attention_mask))
    return out.last_hidden_state


def logit_transform(lm) -> tuple[float, float | None]:
    """(scale, softcap): what the model's own forward does to `lm_head(hidden)` before returning its logits.
    Granite divides by `logits_scaling`, Cohere multiplies by `logit_scale`, Gemma 2/3 soft-cap. The log-probs PPO
    optimizes must be those of the distribution the samples came from; `check_logprob_path` verifies it at start-up
    for architectures that do something else."""
    model = unwrap(lm)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scale = 1.0
    if getattr(config, "logits_scaling", None):
        scale /= float(config.logits_scaling)
    if isinstance(getattr(model, "logit_scale", None), (int, float)):
        scale *= float(model.logit_scale)
    return scale, getattr(config, "final_logit_softcapping", None)


def response_logprobs(lm, hidden, response_ids, temperature: float, fused: bool):
    """(logprobs, entropy), each (B, T) float32, of the response tokens from the hidden states that predict them."""
    head = unwrap(lm).get_output_embeddings()
    scale, softcap = logit_transform(lm)
    if fused and softcap is None:  # a scale folds into the temperature: softmax(s * z / t) = softmax(z / (t / s))
        return ops.linear_token_logprobs(
            hidden, head.weight, response_ids, temperature / scale, head.bias, with_entropy=True
        )
    return ops.token_logprobs_and_entropy(model_logits(lm, hidden), response_ids, temperature)


def model_logits(lm, hidden: torch.Tensor) -> torch.Tensor:
    """(..., V) the logits the model's own forward returns for final hidden states (..., H): the output
    embedding, then `logit_transform`."""
    logits = unwrap(lm).get_output_embeddings()(hidden)
    scale, softcap = logit_transform(lm)
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


@torch.no_grad()
def check_logprob_path(lm, input_ids, attention_mask, fused: bool, tolerance: float) -> float:
    """Compare the trainer's log-probs of `input_ids` with those of the model's own `logits` (the distribution the
    rollout samples from). A gap beyond `tolerance` nats means the architecture transforms its logits in a way
    `logit_transform` does not know: training on it would be silently off-policy, so refuse. Returns the gap."""
    out = lm(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_for(attention_mask),
        use_cache=False,
    )
    targets, valid = input_ids[:, 1:], attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    own = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    hidden = final_hidden(backbone_of(lm), input_ids, attention_mask)[:, :-1]
    ours = response_logprobs(lm, hidden, targets, 1.0, fused)[0]
    gap = float((own - ours).abs().masked_fill(~valid, 0).max()) if valid.any() else 0.0
    if not gap <= tolerance:
        arch = type(unwrap(lm)).__name__
        raise InputError(
            f"{arch}: the log-probs fastppo computes from the hidden states differ from the model's own logits by "
            f"{gap:.3g} nats (tolerance {tolerance:g}): this architecture transforms its logits in a way fastppo "
            "does not apply, and training would optimize another distribution than the one sampled. Please report "
            "the architecture; nothing was trained"
        )
    return gap


class PolicyValueModel(nn.Module):
    """The policy LM plus a value head; `critic='shared'` reads values off the policy's own backbone, 'separate'
    off a copy of it (or, given `critic_init`, off a reward model's body, with its score head), and 'none' (the
    critic-free estimators) builds no value head at all."""

    def __init__(self, lm, critic: str = "shared", fused_logprobs: bool = True, critic_init=None):
        super().__init__()
        self.lm = lm
        self.critic = critic
        self.fused_logprobs = fused_logprobs
        self.padding_free = self.critic_padding_free = False  # fastppo.packing: set by the trainer once checked
        self.value_head = self.critic_backbone = None
        if critic_init is not None:  # a separate critic from a reward model (`load_critic`): its body and score head
            self.critic_backbone, self.value_head = critic_init
        elif critic != "none":
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
        hidden = final_hidden(backbone_of(self.lm), input_ids, attention_mask, self.padding_free)
        hidden = hidden[:, prompt_length - 1 : -1]  # (B, T, H)
        logprobs, entropy = response_logprobs(self.lm, hidden, response_ids, temperature, self.fused_logprobs)
        if self.value_head is None:
            return logprobs, entropy, None
        if self.critic_backbone is not None:
            hidden = final_hidden(self.critic_backbone, input_ids, attention_mask, self.critic_padding_free)
            hidden = hidden[:, prompt_length - 1 : -1]
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
def reference_logprobs(
    reference_lm, input_ids, attention_mask, prompt_length: int, temperature: float, fused: bool, packed: bool = False
):
    """(B, T) float32 log-probs of the response under a frozen reference LM."""
    hidden = final_hidden(backbone_of(reference_lm), input_ids, attention_mask, packed)[:, prompt_length - 1 : -1]
    return response_logprobs(reference_lm, hidden, input_ids[:, prompt_length:], temperature, fused)[0]


def lora_config(rank: int, alpha: float, target_modules="all-linear", dropout: float = 0.0, modules_to_save=()):
    """A peft LoraConfig for the policy, from fastppo's lora_* settings."""
    from peft import LoraConfig

    modules_to_save = list(modules_to_save) or None
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        modules_to_save=modules_to_save,
        task_type="CAUSAL_LM",
    )


def add_lora(lm, rank: int, alpha: float, config=None):
    """`lm` wrapped with LoRA adapters: `config` (a peft LoraConfig, as TRL takes it), else rank `rank` and
    `alpha` on every linear layer. A lora_dropout stays in the adapter's config (adapter_config.json keeps it) and is
    zeroed in the layers, like every dropout in fastppo's forwards (`disable_dropout`)."""
    from peft import get_peft_model

    with peft_wrapping():
        model = get_peft_model(lm, config if config is not None else lora_config(rank, alpha))
    disable_dropout(model)
    return model


def check_critic_model(path: str, policy_tokenizer) -> None:
    """critic_model: a 1-label sequence classifier whose tokenizer is the policy's (the critic reads the policy's
    token ids). Anything else is refused before it loads: a causal LM, a classifier of several labels, a directory
    without weights or without a tokenizer to compare."""
    from fastppo.runtime.validation import check_model_dir

    config = check_model_dir("critic_model", path)
    classes = config.get("architectures") or []
    if not any(name.endswith("ForSequenceClassification") for name in classes):
        held = ", ".join(classes) or f"a {config.get('model_type', 'model')} without a declared class"
        raise InputError(
            f"critic_model: {path} holds {held}, not a sequence classifier: it needs a 1-label "
            "AutoModelForSequenceClassification (a reward model, as `fastppo reward-model` saves one)"
        )
    labels = len(config.get("id2label") or {}) or 2  # transformers' default
    if labels != 1:
        raise InputError(f"critic_model: {path} is a classifier of {labels} labels; a value head needs 1")
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        raise InputError(
            f"critic_model: {path} has no tokenizer, so whether it reads the policy's token ids cannot be checked: "
            "save the tokenizer it was trained with beside it"
        )
    if load_tokenizer(path).get_vocab() != policy_tokenizer.get_vocab():
        raise InputError(
            f"critic_model: {path} was trained with another tokenizer than the policy's; the critic reads the "
            "policy's token ids: use a reward model trained on the policy's tokenizer"
        )


def load_critic(path: str, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """(backbone, value head) from a checked `critic_model` (`check_critic_model`): the classifier's body and its
    score head, on `device` in float32 (master weights, as the policy's), dropout off."""
    from transformers import AutoModelForSequenceClassification

    model = load_pretrained(AutoModelForSequenceClassification, path, "none", device, torch.float32)
    head = getattr(model, "score", None)
    if not isinstance(head, nn.Linear):
        raise InputError(
            f"critic_model: {type(model).__name__} has no `score` head (a Linear layer) to be the value head"
        )
    disable_dropout(model)
    return getattr(model, model.base_model_prefix), head


def score_at_last_token(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, packed: bool = False):
    """(B,) a one-label sequence classifier's output at each right-padded row's last attended token (`packed`:
    computed over the real tokens packed into one row).

    The one way fastppo reads a reward model, in training (`fastppo reward-model`) and in PPO. Hugging Face's own
    pooling reads the last token that is not `pad_token_id`: when pad == EOS, as with most causal LMs, that skips a
    response's EOS, so scores would depend on how the batch was padded. Differentiable: training calls it too.
    """
    if not hasattr(model, "score"):  # an architecture with another head name: its own pooling
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
    backbone = getattr(model, model.base_model_prefix)
    if packed:  # over the real tokens only (fastppo.packing)
        hidden = packed_hidden(backbone, input_ids, attention_mask)
    else:
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
    last = attention_mask.sum(-1) - 1  # (B,)
    return model.score(hidden[torch.arange(len(last), device=hidden.device), last])[:, 0]
