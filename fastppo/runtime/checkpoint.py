"""Checkpoints: the policy in the Hugging Face layout, the value head, and the trainer state, written atomically.

    <output_dir>/checkpoint-<step>/
        config.json, model.safetensors, tokenizer files   the policy (LoRA merged, or adapter_* files), in save_dtype
        master_weights.safetensors                        the float32 policy weights, when save_dtype is not float32
        adapter/                                          the LoRA adapter (always, when training LoRA: resume)
        value_head.safetensors (+ critic.safetensors)     the critic (PPO with a critic)
        trainer_state.pt                                  optimizer, scheduler, KL controller, sampler, RNG, step
        manifest.json                                     sha256 of every file above; written last

A checkpoint is written into a temporary directory beside it (`.tmp-checkpoint-<step>-<pid>`) and renamed into
place, so a crash never leaves a half-written `checkpoint-<step>`; the manifest lets a resume detect a corrupted one
and fall back to the previous. The space it needs is checked first; a disk that fills up anyway stops the run with an
`EnvironmentProblem` (exit 4) and the partial directory removed. Partial directories of processes that died (SIGKILL
inside a save) are removed when the next run starts (`remove_partial_checkpoints`). Weights load through safetensors,
the state through `torch.load(weights_only=True)`: no pickle runs on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import warnings

import torch
from safetensors.torch import load_file, save_file

from fastppo.runtime.errors import EnvironmentProblem, InputError, out_of_space
from fastppo.runtime.validation import LOAD_ERRORS, clip, refuse_to_overwrite, same_directory

STATE_FILE, MANIFEST, MASTER_WEIGHTS = "trainer_state.pt", "manifest.json", "master_weights.safetensors"
STATE_KEYS = ("step", "optimizer", "scheduler", "kl_controller", "score_moments", "sampler", "rng")
# What fastppo changes in memory and takes back out of the files it saves: the drop probabilities `disable_dropout`
# zeroed (their released values, kept on the model under this attribute) and the pad token `load_tokenizer` set.
RELEASED_DROPOUT, PAD_SET_BY_FASTPPO = "fastppo_released_dropout", "fastppo_pad_set"
FINAL_MODEL = "final"  # <output_dir>/final: the model-only export of a finished run (fastppo.runtime.export)


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


def save_checkpoint(
    output_dir: str,
    step: int,
    model,
    tokenizer,
    trainer_state: dict,
    merge_lora: bool,
    dtype: torch.dtype = torch.float32,
    settings: dict | None = None,
) -> str:
    """Write checkpoint-<step> atomically: the policy in the Hugging Face layout in `dtype` (the user's checkpoint
    dtype), plus what resuming needs bit for bit (the float32 master weights when `dtype` rounds them). `settings`
    (`resume_settings`) go into the manifest, for `check_resume_settings`. Not enough space: an
    `EnvironmentProblem`, before writing when the free space already says so, and nothing left behind."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{step}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    needed = _checkpoint_bytes(model, trainer_state, dtype)
    free = _free_bytes(output_dir)
    if free is not None and free < needed:
        raise EnvironmentProblem(_disk_full(final, needed, free, "not written"))
    try:
        os.makedirs(tmp)
        _write(tmp, step, model, tokenizer, trainer_state, merge_lora, dtype, settings)
    except BaseException as error:
        free = _free_bytes(output_dir)  # before the partial directory goes: what the failed write left
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_disk_full(error, free):
            raise EnvironmentProblem(_disk_full(final, needed, free, "the partial checkpoint was removed")) from None
        raise
    replace_dir(tmp, final)  # saving the same step again: the old one is moved aside first, then dropped
    return final


def _write(tmp: str, step: int, model, tokenizer, trainer_state: dict, merge_lora: bool, dtype, settings) -> None:
    """Every file of a checkpoint into the directory `tmp`, the manifest last."""
    lm = model.lm
    save_policy(lm, tmp, merge_lora, dtype)
    if hasattr(lm, "peft_config"):  # the adapter (float32, trained) resumes; the base weights never changed
        lm.save_pretrained(os.path.join(tmp, "adapter"))
    else:
        if dtype != torch.float32:
            # named_parameters: tied weights once; clones: gathered weights may be views of one flat buffer
            master = {name: p.detach().clone() for name, p in lm.named_parameters()}
            save_file(master, os.path.join(tmp, MASTER_WEIGHTS))
    save_tokenizer(tokenizer, tmp)
    if getattr(model, "value_head", None) is not None:  # PPO's critic; DPO passes a model with `.lm` only
        state = {k: v.contiguous() for k, v in model.value_head.state_dict().items()}
        save_file(state, f"{tmp}/value_head.safetensors")
    if getattr(model, "critic_backbone", None) is not None:
        state = {k: v.contiguous() for k, v in model.critic_backbone.state_dict().items()}
        save_file(state, f"{tmp}/critic.safetensors")
    torch.save(trainer_state, os.path.join(tmp, STATE_FILE))
    manifest = {"step": step, "files": {name: _sha256(os.path.join(tmp, name)) for name in _files(tmp)}}
    if settings is not None:
        manifest["settings"] = settings
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)


def save_policy(lm, directory: str, merge_lora: bool, dtype: torch.dtype) -> None:
    """The policy LM in the Hugging Face layout, weights in `dtype`: LoRA merged into the weights, or (merge_lora
    False) its adapter files alone (adapter_config.json, adapter_model.safetensors)."""
    if not hasattr(lm, "peft_config"):
        save_weights(lm, directory, dtype)
    elif merge_lora:
        import copy

        save_weights(copy.deepcopy(lm).merge_and_unload(), directory, dtype)
    else:
        lm.save_pretrained(directory)


def replace_dir(tmp: str, final: str) -> None:
    """Rename the finished directory `tmp` to `final`; one already there (the same step saved again) is moved aside
    first and dropped after, so `final` is at every moment either whole or absent."""
    if os.path.exists(final):
        trash = f"{final}.old-{os.getpid()}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)


# --- space ----------------------------------------------------------------------------------------------------

_SPARE = 16 << 20  # bytes for what is not counted: tokenizer files, config, manifest, pickle framing


def _tensor_bytes(value) -> int:
    """The bytes of every tensor in a (nested) state: dicts, lists, tuples."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _checkpoint_bytes(model, trainer_state: dict, dtype: torch.dtype) -> int:
    """About what `save_checkpoint` writes: the weights in `dtype` (twice with LoRA: merged and adapter, bounded by
    the whole model), the float32 master copy when `dtype` is narrower, the critic, the trainer state."""
    parameters = list(model.lm.parameters())
    size = sum(p.numel() for p in parameters) * dtype.itemsize
    if dtype != torch.float32:
        size += sum(p.numel() for p in parameters) * 4
    for part in ("value_head", "critic_backbone"):
        if getattr(model, part, None) is not None:
            size += sum(p.numel() * p.element_size() for p in getattr(model, part).parameters())
    return size + _tensor_bytes(trainer_state) + _SPARE


def _free_bytes(directory: str) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def _is_disk_full(error: BaseException, free: int | None) -> bool:
    """`errors.out_of_space`, or a write error that says nothing of space (torch.save's C++ stream: "unexpected
    pos", "iostream error") with almost none left."""
    if out_of_space(error):
        return True
    return isinstance(error, (OSError, RuntimeError)) and free is not None and free < _SPARE


def _disk_full(final: str, needed: int, free: int | None, what_happened: str) -> str:
    output_dir, name = os.path.split(final)
    have = "unknown" if free is None else f"{free / 2**20:.0f} MiB"
    return (
        f"disk full: {name} in {output_dir} needs about {needed / 2**20:.0f} MiB, {have} free; {what_happened}, "
        f"{last_checkpoint_note(output_dir)}. Free some space (or move output_dir) and continue with --resume"
    )


def last_checkpoint_note(output_dir: str) -> str:
    """Which checkpoint a stopped run leaves to resume from: the newest complete one (its manifest, written last,
    is there), or none."""
    for _, checkpoint in reversed(list_checkpoints(output_dir)):
        if os.path.isfile(os.path.join(checkpoint, MANIFEST)):
            return f"the last checkpoint, {checkpoint}, is intact"
    return f"no checkpoint of this run was saved in {output_dir}"


def remove_partial_checkpoints(output_dir: str) -> None:
    """At start-up, with the run lock held: remove the `.tmp-checkpoint-<step>-<pid>` directories of processes that
    are no longer alive on this host (a SIGKILL inside a save), and put back a `checkpoint-<step>.old-<pid>` a save of
    the same step moved aside and died before replacing."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    for name in names:
        partial = re.fullmatch(r"\.tmp-checkpoint-\d+-(\d+)", name)
        if partial and _dead(int(partial.group(1))):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
            print(f"fastppo: removed {name}, a partial checkpoint of a process that ended", file=sys.stderr)
        moved = re.fullmatch(r"(checkpoint-\d+)\.old-(\d+)", name)
        if moved and _dead(int(moved.group(2))):
            final = os.path.join(output_dir, moved.group(1))
            if os.path.exists(final):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
            else:
                os.replace(os.path.join(output_dir, name), final)


def _dead(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def save_model(model, tokenizer, output_dir: str) -> None:
    """A finished model as a Hugging Face directory (safetensors + tokenizer), as `fastppo sft` and
    `fastppo reward-model` leave it; a run's resumable checkpoints are `save_checkpoint`'s."""
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir, safe_serialization=True)
    save_tokenizer(tokenizer, output_dir)


def save_tokenizer(tokenizer, directory: str) -> None:
    """`tokenizer.save_pretrained(directory)` as the tokenizer was given: a pad token `load_tokenizer` set for
    batching (the EOS, where the tokenizer had none) is left out of the files."""
    added = getattr(tokenizer, PAD_SET_BY_FASTPPO, False) and tokenizer.pad_token == tokenizer.eos_token
    if added:
        tokenizer.pad_token = None
    try:
        tokenizer.save_pretrained(directory)
    finally:
        if added:
            tokenizer.pad_token = tokenizer.eos_token


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


def refuse_mixing_runs(output_dir: str, resume_from: str | None, overwrite: bool) -> None:
    """Refuse an output_dir holding a previous run's checkpoints or metrics.jsonl, unless this run continues it
    (resume_from is output_dir or one of its checkpoints) or overwrite_output_dir starts over (`clear_previous_run`
    then removes its checkpoints, once everything has loaded). Resuming another run's checkpoint is a new run: it
    needs an output_dir of its own (or overwrite), or it would write over the run that is there."""
    if overwrite or continues_run(resume_from, output_dir):
        return
    found = [os.path.basename(path) for _, path in list_checkpoints(output_dir)]
    what = "checkpoints" if found else "a previous run's metrics"
    found += ["metrics.jsonl"] if os.path.isfile(os.path.join(output_dir, "metrics.jsonl")) else []
    if resume_from is None:
        how = "set resume_from (or --resume) to continue, or overwrite_output_dir: true to start over"
    else:
        how = f"resume_from ({resume_from}) is another run's, so this is a new run: set overwrite_output_dir: true"
    refuse_to_overwrite("output_dir", output_dir, what, found, how)


def continues_run(resume_from: str | None, output_dir: str) -> bool:
    """Whether resuming from `resume_from` continues the run in `output_dir` (its directory or a checkpoint of it)."""
    if resume_from is None:
        return False
    here, there = os.path.realpath(output_dir), os.path.realpath(resume_from)
    return there == here or os.path.dirname(there) == here


def clear_previous_run(output_dir: str, resume_from: str | None, overwrite: bool) -> None:
    """overwrite_output_dir, starting over: remove the previous run's checkpoints, or a later resume would find its
    newer ones (metrics.jsonl is rewritten by the new run's first step)."""
    if not overwrite or continues_run(resume_from, output_dir):
        return
    old = list_checkpoints(output_dir)
    for _, path in old:
        shutil.rmtree(path)
    if old:
        print(f"fastppo: overwrite_output_dir: removed the previous run's {len(old)} checkpoint(s) in {output_dir}")
    final = os.path.join(output_dir, FINAL_MODEL)
    if os.path.isdir(final):  # the previous run's final model must not pass for this one's
        shutil.rmtree(final)
        print(f"fastppo: overwrite_output_dir: removed the previous run's final model {final}")


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    found = []
    for name in os.listdir(run_dir) if os.path.isdir(run_dir) else []:
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        if match:
            found.append((int(match.group(1)), os.path.join(run_dir, name)))
    return sorted(found)


def prune_checkpoints(run_dir: str, limit: int, newest: str) -> list[str]:
    """save_total_limit: once the just-saved `newest` verifies, remove the oldest checkpoints of `run_dir` until
    `limit` remain (the newest always among them). A newest that does not verify removes nothing: the older ones
    hold the last good state. Returns the removed paths."""
    problem = verify(newest)
    if problem is not None:
        warnings.warn(
            f"save_total_limit: {newest} does not verify ({problem}); no older checkpoint removed", stacklevel=2
        )
        return []
    older = [path for _, path in list_checkpoints(run_dir) if os.path.realpath(path) != os.path.realpath(newest)]
    removed = older[: max(len(older) + 1 - limit, 0)]
    for path in removed:
        shutil.rmtree(path)
    return removed


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


def resume_checkpoint(resume_from: str | None, output_dir: str, announce: bool = True) -> str | None:
    """The checkpoint a run resumes from (`find_resumable`), or None for a fresh run: no resume_from, or resume_from
    is the run's own output_dir and it holds no checkpoint yet (a job stopped before its first save), said in one
    line when `announce`: a launcher can always pass --resume."""
    if resume_from is None:
        return None
    if same_directory(resume_from, output_dir) and not list_checkpoints(output_dir):
        if announce:
            print(f"fastppo: --resume: no checkpoint in {output_dir} yet: starting a fresh run")
        return None
    return find_resumable(resume_from)


# What a PPO checkpoint's weights and optimizer state were made with: a resumed run must build the same model.
RESUME_FIXED = ("critic", "lora_rank", "lora_alpha")
# Restored from the checkpoint's optimizer state whatever the config says now.
RESUME_RESTORED = ("learning_rate", "weight_decay")
# Honoured on resume, and said: the trainer applies the new value (PPOTrainer._resume) instead of the saved state.
RESUME_HONOURED = {
    "kl_coef": "the KL coefficient restarts at the new value, not the checkpoint's controller's",
    "adaptive_kl_target": "the KL controller adapts toward the new target",
    "kl_horizon": "the KL controller adapts at the new horizon",
    "seed": "the prompt order starts a new epoch and the random streams are seeded from the new seed",
}


def saved_settings(checkpoint: str) -> dict:
    """The settings `checkpoint` recorded when it was saved (empty for checkpoints from before they were)."""
    with open(os.path.join(checkpoint, MANIFEST), encoding="utf-8") as f:
        return json.load(f).get("settings") or {}


def check_resume_settings(
    checkpoint: str, settings: dict, new_reference: bool = False, log=print, fixed: tuple = RESUME_FIXED
) -> dict:
    """Before any model loads, what changed since `checkpoint` was saved (returned: name -> (saved, now)):
    a `fixed` setting is refused (the checkpoint holds another model's weights or optimizer state); so is
    another reference (`settings["reference"]`: the policy_model whose weights the KL is measured against, by digest)
    unless `new_reference` (resume_new_reference) accepts it; a RESUME_RESTORED one gets a warning; a RESUME_HONOURED
    one and other prompts (`settings["prompts"]`) are honoured and said through `log`. Checkpoints saved before
    settings were recorded are not checked."""
    saved = saved_settings(checkpoint)
    changed = {k: (saved[k], v) for k, v in settings.items() if k in saved and saved[k] != v}
    refused = [k for k in fixed if k in changed]
    if refused:
        listed = ", ".join(f"{k} {changed[k][0]!r} -> {changed[k][1]!r}" for k in refused)
        raise InputError(
            f"resume_from: {checkpoint} was trained with other settings ({listed}); its weights, optimizer state "
            "and batch order fit only those: resume with them, or start a new run"
        )
    if "reference" in changed:
        _check_reference(checkpoint, *changed["reference"], new_reference, log)
    for k in RESUME_RESTORED:
        if k in changed:
            warnings.warn(
                f"{k}: {changed[k][1]!r} has no effect on resume; the optimizer state of {checkpoint} "
                f"keeps {changed[k][0]!r}",
                stacklevel=2,
            )
    for k, meaning in RESUME_HONOURED.items():
        if k in changed:
            log(f"fastppo: resume: {k} {changed[k][0]!r} -> {changed[k][1]!r}: {meaning}")
    if "prompts" in changed:
        (old, new) = changed["prompts"]
        log(
            f"fastppo: resume: warning: prompts {new['source']} are not those {checkpoint} was trained on "
            f"({old['count']} prompts, digest {old['digest'][:12]}; now {new['count']}, digest "
            f"{new['digest'][:12]}): honoured, the sampler starts a new epoch over the new prompts"
        )
    return changed


def _check_reference(checkpoint: str, old: dict, new: dict, accept: bool, log) -> None:
    """The reference's weights (digests) changed: refused unless accepted; only its path changed: said."""
    if not (old.get("digest") and new.get("digest")) or old["digest"] == new["digest"]:
        if old.get("path") != new.get("path"):
            log(f"fastppo: resume: policy_model {old.get('path')} -> {new.get('path')}: the same weights")
        return
    if not accept:
        raise InputError(
            f"policy_model: {new['path']} holds other weights than {old['path']}, the reference {checkpoint} was "
            "trained against (the model the KL penalty pulls toward, and the base of LoRA adapters): resuming with "
            f"it would change the KL reference silently. Resume with policy_model: {old['path']}, or set "
            "resume_new_reference: true to measure the KL against the new weights from here on"
        )
    log(f"fastppo: resume: resume_new_reference: the KL is measured against {new['path']} from here on")


def load_checkpoint(checkpoint: str, model, state_keys: tuple = STATE_KEYS) -> dict:
    """Load the weights of `checkpoint` into `model` (in place) and return the trainer state, which must hold
    `state_keys` (PPO's by default). A file that does not load (damaged despite its checksum, or weights of another
    model's sizes) stops the run naming it."""
    try:
        _load_weights(checkpoint, model)
    except (*LOAD_ERRORS, KeyError) as error:  # KeyError: a parameter the checkpoint lacks (another architecture)
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
        saved = type(lm).from_pretrained(checkpoint, dtype=next(lm.parameters()).dtype)  # a causal LM or a classifier
        lm.load_state_dict(saved.state_dict())
    if getattr(model, "value_head", None) is not None:
        model.value_head.load_state_dict(load_file(os.path.join(checkpoint, "value_head.safetensors")))
    if getattr(model, "critic_backbone", None) is not None:
        model.critic_backbone.load_state_dict(load_file(os.path.join(checkpoint, "critic.safetensors")))


def save_weights(model, directory: str, dtype: torch.dtype) -> None:
    """`model.save_pretrained(directory)` with the weights (and config.json's dtype) in `dtype`: a float32 master
    copy of a bf16 checkpoint is saved back as bf16. Tied weights (an LM head sharing the embedding) stay one tensor,
    saved once, and config.json gets back the drop probabilities `disable_dropout` zeroed in memory."""
    converted: dict[tuple, torch.Tensor] = {}  # one conversion per stored tensor: tied names keep sharing it
    state = {}
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            key = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride())
            if key not in converted:
                converted[key] = tensor.to(dtype)
            tensor = converted[key]
        state[name] = tensor
    model.save_pretrained(directory, state_dict=state)
    config_path = os.path.join(directory, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    _overlay(config, getattr(model, RELEASED_DROPOUT, {}))
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def _overlay(config: dict, values: dict) -> None:
    """Write `values` (nested like the config: a sub-config's values under its key) into `config`."""
    for name, value in values.items():
        if isinstance(value, dict):
            if isinstance(config.get(name), dict):
                _overlay(config[name], value)
        else:
            config[name] = value
