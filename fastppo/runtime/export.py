"""The final model: one folder that `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load,
written at the end of `fastppo train` (<output_dir>/final) and by `PPOTrainer.save_model(path)`.

    config.json, model.safetensors, generation_config.json   the policy in the checkpoint's dtype (save_dtype), the
                                                             released dropout in its config, tied weights once
    adapter_config.json, adapter_model.safetensors           instead, with LoRA and save_merged_lora: false
    tokenizer.json, tokenizer_config.json, chat_template.*   its tokenizer as it was given (no pad token fastppo set)

No value head, optimizer state or float32 master weights: a checkpoint-<step> is what resumes a run. The folder is
written beside its place and renamed into it. Then it is read back the way its users will read it, with plain
`AutoTokenizer.from_pretrained`, which must tokenize probe texts (the run's prompts, its chat template's output)
exactly as training did. transformers 5 picks a tokenizer class from the model type for some types (qwen2): a
tokenizer saved as a generic one (`tokenizer_class` TokenizersBackend) is then rebuilt as Qwen2Tokenizer, which
tokenizes another vocabulary wrongly. For such a folder the tokenizer config also names the generic class in its
`auto_map`, which transformers honours for those model types; a folder that still tokenizes otherwise is reported.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings

import torch

from fastppo.runtime.checkpoint import replace_dir, save_policy, save_tokenizer

GENERIC_TOKENIZER = "TokenizersBackend"


def export_model(lm, tokenizer, path: str, merge_lora: bool, dtype: torch.dtype, probes: list[str]) -> str:
    """Write the final model of `lm` and `tokenizer` to `path` (replacing an earlier export there) and check that
    plain transformers loads the tokenizer as it was trained with (`probes`: texts to compare). Returns `path`."""
    path = os.path.abspath(path)
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_policy(lm, tmp, merge_lora, dtype)
    if hasattr(lm, "peft_config") and not merge_lora:
        _adapter_extras(lm, tmp)
    save_tokenizer(tokenizer, tmp)
    difference = _checked(tokenizer, tmp, probes)
    if difference is not None:
        config_path = os.path.join(tmp, "tokenizer_config.json")
        with open(config_path, "rb") as f:
            as_saved = f.read()
        _name_the_generic_class(config_path)
        difference = _checked(tokenizer, tmp, probes)
        if difference is not None:  # no better: leave the files as transformers wrote them
            with open(config_path, "wb") as f:
                f.write(as_saved)
    if difference is not None:
        warnings.warn(
            f"{path}: AutoTokenizer.from_pretrained does not load its tokenizer as it was trained ({difference}); "
            "load it with transformers.PreTrainedTokenizerFast.from_pretrained (or fastppo.models.load_tokenizer)",
            stacklevel=2,
        )
    replace_dir(tmp, path)
    return path


def _adapter_extras(lm, directory: str) -> None:
    """The adapter alone: the base model's generation config beside it, and its base as an absolute path, so that
    `from_pretrained` finds it from any working directory."""
    base = lm.get_base_model()
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(directory)
    config_path = os.path.join(directory, "adapter_config.json")
    with open(config_path) as f:
        config = json.load(f)
    source = config.get("base_model_name_or_path")
    if source and os.path.isdir(source):
        config["base_model_name_or_path"] = os.path.abspath(source)
        with open(config_path, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)


def first_difference(tokenizer, directory: str, probes: list[str]) -> str | None:
    """The first probe that plain `AutoTokenizer.from_pretrained(directory)` tokenizes otherwise than `tokenizer`
    (with and without special tokens), the chat template's output included; None when every one agrees."""
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(directory)
    texts = list(probes)
    template = getattr(tokenizer, "chat_template", None)
    if template:
        if getattr(loaded, "chat_template", None) != template:
            return "<the chat template>"
        messages = [{"role": "user", "content": probes[0] if probes else "hello"}]
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    for text in texts:
        for special in (True, False):
            if (
                tokenizer(text, add_special_tokens=special)["input_ids"]
                != loaded(text, add_special_tokens=special)["input_ids"]
            ):
                return text
    return None


def _checked(tokenizer, directory: str, probes: list[str]) -> str | None:
    """What `first_difference` finds, in words, or None; a folder transformers cannot load the tokenizer from is one
    difference more."""
    try:
        difference = first_difference(tokenizer, directory, probes)
    except (OSError, ValueError) as error:
        return f"it does not load: {error}"
    return None if difference is None else f"it tokenizes {difference!r} differently"


def _name_the_generic_class(path: str) -> None:
    """The tokenizer config at `path` names the generic class in its `auto_map`: transformers 5 loads it, without
    running any code, for the model types whose hub tokenizer class it otherwise overrides (qwen2 and others)."""
    with open(path) as f:
        config = json.load(f)
    if config.get("tokenizer_class") not in (GENERIC_TOKENIZER, "PreTrainedTokenizerFast"):
        return
    config["tokenizer_class"] = GENERIC_TOKENIZER
    config["auto_map"] = {"AutoTokenizer": [None, GENERIC_TOKENIZER]}
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
