"""Checkpoints: the policy in the Hugging Face layout, the value head, and the trainer state, written atomically.

    <output_dir>/checkpoint-<step>/
        config.json, model.safetensors, tokenizer files   the policy (LoRA merged, or adapter_* files), in save_dtype
        master_weights.safetensors                        the float32 policy weights, when save_dtype is not float32
        adapter/                                          the LoRA adapter (always, when training LoRA: resume)
        value_head.safetensors (+ critic.safetensors)     the critic (PPO with a critic)
        trainer_state.pt                                  optimizer, scheduler, KL controller, sampler, RNG, step
        manifest.json                                     sha256 of every file above; written last

A checkpoint is written into a temporary directory beside it and renamed into place, so a crash never leaves a
half-written `checkpoint-<step>`; the manifest lets a resume detect a corrupted one and fall back to the previous.
Weights load through safetensors, the state through `torch.load(weights_only=True)`: no pickle runs on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings

import torch
from safetensors.torch import load_file, save_file

from fastppo.errors import InputError
from fastppo.models import save_weights
from fastppo.validation import LOAD_ERRORS, clip, refuse_to_overwrite

STATE_FILE, MANIFEST, MASTER_WEIGHTS = "trainer_state.pt", "manifest.json", "master_weights.safetensors"
STATE_KEYS = ("step", "optimizer", "scheduler", "kl_controller", "score_moments", "sampler", "rng")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: str) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(root, name), directory)
        for root, _, names in os.walk(directory)
        for name in names
        if name != MANIFEST
    )


def save_checkpoint(output_dir: str, step: int, model, tokenizer, trainer_state: dict, merge_lora: bool,
                    dtype: torch.dtype = torch.float32) -> str:  # fmt: skip
    """Write checkpoint-<step> atomically: the policy in the Hugging Face layout in `dtype` (the user's checkpoint
    dtype), plus what resuming needs bit for bit (the float32 master weights when `dtype` rounds them)."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{step}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    lm = model.lm
    if hasattr(lm, "peft_config"):  # the adapter (float32, trained) resumes; the base weights never changed
        lm.save_pretrained(os.path.join(tmp, "adapter"))
        if merge_lora:
            import copy

            save_weights(copy.deepcopy(lm).merge_and_unload(), tmp, dtype)
        else:
            lm.save_pretrained(tmp)
    else:
        save_weights(lm, tmp, dtype)
        if dtype != torch.float32:
            # named_parameters: tied weights once; clones: gathered weights may be views of one flat buffer
            master = {name: p.detach().clone() for name, p in lm.named_parameters()}
            save_file(master, os.path.join(tmp, MASTER_WEIGHTS))
    tokenizer.save_pretrained(tmp)
    if getattr(model, "value_head", None) is not None:  # PPO's critic; DPO passes a model with `.lm` only
        state = {k: v.contiguous() for k, v in model.value_head.state_dict().items()}
        save_file(state, f"{tmp}/value_head.safetensors")
    if getattr(model, "critic_backbone", None) is not None:
        state = {k: v.contiguous() for k, v in model.critic_backbone.state_dict().items()}
        save_file(state, f"{tmp}/critic.safetensors")
    torch.save(trainer_state, os.path.join(tmp, STATE_FILE))
    manifest = {"step": step, "files": {name: _sha256(os.path.join(tmp, name)) for name in _files(tmp)}}
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    if os.path.exists(final):  # saving the same step again: move the old one aside first, then drop it
        trash = f"{final}.old-{os.getpid()}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def save_model(model, tokenizer, output_dir: str) -> None:
    """A finished model as a Hugging Face directory (safetensors + tokenizer), as `fastppo sft` and
    `fastppo reward-model` leave it; a run's resumable checkpoints are `save_checkpoint`'s."""
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)


def verify(checkpoint: str) -> str | None:
    """None when the checkpoint is complete and every checksum matches, else what is wrong."""
    path = os.path.join(checkpoint, MANIFEST)
    if not os.path.isfile(path):
        return "no manifest (incomplete)"
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as error:
        return f"unreadable manifest ({error})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        return "the manifest lists no files (damaged)"
    for name, digest in files.items():
        file = os.path.join(checkpoint, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        if _sha256(file) != digest:
            return f"{name} does not match its checksum"
    return None


def check_output_dir(output_dir: str, continuing: bool) -> None:
    """A fresh run (not `continuing`: resuming or overwrite_output_dir) refuses an output_dir holding a previous
    run's checkpoints or metrics.jsonl (with overwrite_output_dir checkpoints are replaced step by step, and
    metrics.jsonl at the first step)."""
    if continuing:
        return
    found = [os.path.basename(path) for _, path in list_checkpoints(output_dir)]
    what = "checkpoints" if found else "a previous run's metrics"
    found += ["metrics.jsonl"] if os.path.isfile(os.path.join(output_dir, "metrics.jsonl")) else []
    how = "set resume_from (or --resume) to continue, or overwrite_output_dir: true to start over"
    refuse_to_overwrite("output_dir", output_dir, what, found, how)


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    found = []
    for name in os.listdir(run_dir) if os.path.isdir(run_dir) else []:
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        if match:
            found.append((int(match.group(1)), os.path.join(run_dir, name)))
    return sorted(found)


def find_resumable(path: str) -> str:
    """The checkpoint to resume from: `path` itself, or the newest valid checkpoint of the run directory `path`."""
    if os.path.isfile(os.path.join(path, MANIFEST)) or os.path.isfile(os.path.join(path, STATE_FILE)):
        problem = verify(path)
        if problem:
            raise InputError(f"resume_from: checkpoint {path} is damaged: {problem}")
        return path
    for _step, checkpoint in reversed(list_checkpoints(path)):
        problem = verify(checkpoint)
        if problem is None:
            return checkpoint
        warnings.warn(f"skipping damaged checkpoint {checkpoint}: {problem}", stacklevel=2)
    raise InputError(f"resume_from: no valid checkpoint in {path}")


def load_checkpoint(checkpoint: str, model, state_keys: tuple = STATE_KEYS) -> dict:
    """Load the weights of `checkpoint` into `model` (in place) and return the trainer state, which must hold
    `state_keys` (PPO's by default). A file that does not load (damaged despite its checksum, or weights of another
    model's sizes) stops the run naming it."""
    try:
        _load_weights(checkpoint, model)
    except LOAD_ERRORS as error:
        raise InputError(f"resume_from: cannot load the weights of {checkpoint} ({clip(error)})") from None
    path = os.path.join(checkpoint, STATE_FILE)
    try:
        state = torch.load(path, weights_only=True)
    except Exception as error:  # noqa: BLE001 - unpickling a damaged file raises anything
        raise InputError(f"resume_from: {path} is damaged ({type(error).__name__}: {clip(error)})") from None
    missing = [key for key in state_keys if not isinstance(state, dict) or key not in state]
    if missing:
        raise InputError(f"resume_from: {path} is damaged or not a fastppo trainer state (no {', '.join(missing)})")
    return state


def _load_weights(checkpoint: str, model) -> None:
    from transformers import AutoModelForCausalLM

    lm = model.lm
    if hasattr(lm, "peft_config"):
        from peft import set_peft_model_state_dict

        adapter = os.path.join(checkpoint, "adapter")
        weights = load_file(os.path.join(adapter, "adapter_model.safetensors"))
        set_peft_model_state_dict(lm, weights)
    elif os.path.isfile(os.path.join(checkpoint, MASTER_WEIGHTS)):
        master = load_file(os.path.join(checkpoint, MASTER_WEIGHTS))
        with torch.no_grad():
            for name, p in lm.named_parameters():
                p.copy_(master[name])
    else:
        saved = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=next(lm.parameters()).dtype)
        lm.load_state_dict(saved.state_dict())
    if getattr(model, "value_head", None) is not None:
        model.value_head.load_state_dict(load_file(os.path.join(checkpoint, "value_head.safetensors")))
    if getattr(model, "critic_backbone", None) is not None:
        model.critic_backbone.load_state_dict(load_file(os.path.join(checkpoint, "critic.safetensors")))
