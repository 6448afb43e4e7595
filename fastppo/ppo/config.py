"""PPOConfig: every knob of a fastppo run, in one typed dataclass, validated in one place.

YAML run files mirror these field names (`fastppo train --config run.yaml --set key=value`). `validate()` checks
everything it can before any model is loaded: unknown keys, types, ranges, batch sizes that must divide, paths that
must exist. Every error is an `InputError` that names the field.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field

from fastppo.ops.reference import KL_ESTIMATORS, LOSS_AGGREGATIONS
from fastppo.runtime.errors import InputError
from fastppo.runtime.precision import PRECISIONS
from fastppo.runtime.validation import (
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    Interval,
    check_finite,
    check_int64,
    check_output_dir,
    check_range,
    clip,
    parse_float,
    short,
)

MAX_CONFIG_BYTES = 8 << 20  # a run config is a few KB; anything this big is the wrong file (or prompts inline)


def _f(default, help: str, **kwargs):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class PPOConfig:
    # --- models -----------------------------------------------------------------------------------------------
    policy_model: str | None = _f(None, "Path of the causal LM to train (a Hugging Face checkpoint directory).")
    tokenizer: str | None = _f(None, "Tokenizer path; defaults to policy_model.")
    reward_model: str | None = _f(
        None, "Path of a 1-label AutoModelForSequenceClassification, or 'module:function' taking (prompts, responses)."
    )
    reward_tokenizer: str | None = _f(None, "Reward model tokenizer path; defaults to reward_model.")
    critic: str = _f("shared", "'shared': value head on the policy backbone (one model); 'separate': own backbone.")
    reference: str = _f("copy", "'copy': a frozen copy of the initial policy; 'adapter': the policy, LoRA disabled.")
    reference_quantization: str = _f("none", "Load the reference copy 'none', '8bit' or '4bit' (NF4, bitsandbytes).")
    reward_quantization: str = _f("none", "Load the reward model 'none', '8bit' or '4bit'.")
    lora_rank: int = _f(0, "LoRA rank for the policy; 0 trains every weight.")
    lora_alpha: float = _f(16.0, "LoRA scaling numerator (effective scale lora_alpha / lora_rank).")
    save_merged_lora: bool = _f(True, "Save LoRA merged into the weights (True) or as an adapter (False).")
    save_dtype: str = _f(
        "auto",
        "dtype of the saved policy weights: 'auto' (the checkpoint's own, e.g. bf16), 'float32', 'bfloat16' or "
        "'float16'. Training always updates float32 master weights.",
    )
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward: less memory, ~30% more time.")
    fused_logprobs: bool = _f(True, "Compute log-probs from hidden states without materializing the logits.")
    device: str = _f("auto", "'auto' (CUDA if present), 'cpu' or 'cuda'.")
    precision: str = _f(
        "auto",
        "What the models compute in: 'bf16' (autocast; weights, optimizer and losses stay float32), 'float32', or "
        "'auto': bf16 on CUDA, float32 on a CPU (bf16 pays only on CPUs with AMX / AVX-512 BF16: `fastppo doctor`).",
    )
    parallel: str = _f(
        "ddp",
        "Under torchrun: 'ddp' replicates the policy, 'fsdp' shards it (FSDP2); 'none' refuses several "
        "processes. One process runs unwrapped whatever this says. Batch sizes are global: each rank takes 1/N.",
    )
    # --- data and rollout -------------------------------------------------------------------------------------
    prompts: typing.Any = _f(None, "JSONL of {'prompt': ...} or {'messages': [...]} lines, or a list of strings.")
    max_prompt_length: int = _f(256, "Prompt tokens kept; longer prompts are cut from the left (see below).")
    truncate_long_prompts: bool = _f(
        True,
        "Cut prompts over max_prompt_length from the left, with a warning; "
        "false: refuse at load, naming the first one's file:line.",
    )
    rollout_batch_size: int = _f(16, "Sequences per PPO iteration: rollout_batch_size / samples_per_prompt prompts.")
    max_new_tokens: int = _f(64, "Response length limit, in tokens.")
    temperature: float = _f(1.0, "Sampling temperature; the log-probs PPO uses are taken at the same temperature.")
    top_k: int = _f(0, "Sample from the k most likely tokens only; 0 = off.")
    top_p: float = _f(1.0, "Nucleus sampling mass; 1.0 = off.")
    stop_strings: list = _f([], "Strings that end a response, besides the end-of-turn tokens.")
    stop_token_ids: list = _f(
        [], "Token ids that end a response, besides the tokenizer's EOS and generation_config.json's eos_token_id."
    )
    # --- rollout engine (vLLM) ---------------------------------------------------------------------------------
    rollout_engine: str = _f(
        "hf",
        "'hf': fastppo's own decode loop (the reference); 'vllm': an in-process vLLM engine per rank (pip "
        'install "fastppo[vllm]"), its weights synced after every optimizer step.',
    )
    old_logprobs: str = _f(
        "auto",
        "Where the old policy's log-probs (and a shared critic's values) come from: 'rollout' keeps those the hf "
        "engine's decode computed for the tokens it sampled (no second pass over the batch; they differ from a "
        "full forward's by float32 rounding, ~1e-6); 'recompute' runs the policy over the batch again; 'auto' = "
        "rollout with the hf engine in float32, recompute under bf16 autocast (`precision`) and with vLLM.",
    )
    vllm_gpu_memory_utilization: float = _f(0.3, "CUDA: the fraction of GPU memory vLLM may take (weights + KV).")
    vllm_max_model_len: int | None = _f(None, "vLLM's context length; None = max_prompt_length + max_new_tokens.")
    vllm_enable_sleep_mode: bool = _f(True, "CUDA: vLLM frees its memory during training, wakes for the rollout.")
    vllm_kv_cache_bytes: int | None = _f(
        None,
        "vLLM's KV cache in bytes; None = gpu_memory_utilization on CUDA, 256 MiB on CPU (vLLM's CPU default "
        "takes 16 GiB).",
    )
    vllm_tensor_parallel_size: int = _f(1, "GPUs one vLLM engine spans; 1 = each rank generates its own share.")
    rollout_correction: str = _f(
        "none",
        "Correct for the sampler's log-probs differing from the trainer's: 'tis' weights each token's "
        "policy-gradient term by min(pi_old / pi_sampler, cap); 'mis' masks sequences whose ratio leaves "
        "[1/cap, cap]; 'none'. Needs rollout_engine: vllm (the hf engine samples from the trainer's own model).",
    )
    rollout_correction_cap: float = _f(2.0, "The cap of rollout_correction (> 1): TIS truncation, MIS bounds.")
    # --- reward and KL ----------------------------------------------------------------------------------------
    kl_coef: float = _f(0.05, "Initial weight of the per-token KL penalty against the reference.")
    kl_target: float | None = _f(None, "Target KL per sequence for adaptive control (Ziegler et al. 2019); None=fixed.")
    kl_horizon: int = _f(10000, "Adaptive KL horizon, in episodes: how fast kl_coef moves toward the target.")
    kl_estimator: str = _f("k1", "Per-token KL estimator: k1 (log-ratio), k2, k3 (low variance) or abs.")
    missing_eos_penalty: float | None = _f(None, "Subtracted from the score of responses that never emit EOS.")
    reward_normalization: bool = _f(False, "Divide scores by a running std (and subtract its mean).")
    reward_clip: float | None = _f(None, "Clip (normalized) scores to [-reward_clip, reward_clip].")
    reward_timeout: float | None = _f(
        600.0,
        "Seconds a reward function may take for one batch before the run stops naming it (exit 2). It runs in a "
        "worker thread, which cannot be killed: the process exits with it. null: no limit, called in the main thread "
        "(for a reward that uses signals itself).",
    )
    # --- advantages and update --------------------------------------------------------------------------------
    gamma: float = _f(1.0, "Discount per token; 1.0 is standard for RLHF (the reward comes at the end).")
    lam: float = _f(0.95, "GAE lambda: bias/variance trade-off of the advantage estimate.")
    whiten_advantages: bool = _f(
        True, "Normalize GAE advantages over the batch (reinforce++ always does; group estimators never need to)."
    )
    ppo_epochs: int = _f(1, "Passes over each rollout batch.")
    mini_batch_size: int = _f(16, "Sequences per optimizer step; must divide rollout_batch_size.")
    micro_batch_size: int | None = _f(None, "Sequences per forward/backward (gradient accumulation); None = mini.")
    learning_rate: float = _f(1e-5, "AdamW learning rate.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    lr_scheduler: str = _f("constant", "'constant', 'linear' or 'cosine' decay after warmup.")
    warmup_steps: int = _f(0, "Optimizer steps of linear warmup.")
    max_grad_norm: float | None = _f(1.0, "Gradient clipping norm; None = off.")
    target_kl: float | None = _f(
        None,
        "Stop a step's updates at the first minibatch whose approx_kl (per token, to "
        "the rollout policy) exceeds this, without its update (SB3); None = off.",
    )
    clip_range: float = _f(0.2, "PPO ratio clip epsilon (lower side; also the upper one unless clip_range_high).")
    clip_range_high: float | None = _f(None, "Upper ratio clip ('clip-higher'); None = clip_range.")
    dual_clip: float | None = _f(None, "Dual-clip constant c > 1 for negative advantages; None = off.")
    clip_range_value: float | None = _f(0.2, "Value clip around the old values; None = plain squared error.")
    vf_coef: float = _f(0.1, "Weight of the value loss.")
    entropy_coef: float = _f(0.0, "Weight of the entropy bonus.")
    loss_agg: str = _f("token-mean", "Loss aggregation: token-mean, seq-mean-token-mean or seq-mean-token-sum.")
    # --- advantage estimator: critic-free, VAPO, DAPO --------------------------------------------------------
    advantage_estimator: str = _f(
        "gae",
        "'gae' (PPO with a critic), or critic-free (no value head, no critic memory; `critic` is ignored): 'grpo', "
        "'dr_grpo', 'rloo' (group baselines), 'reinforce++' (returns whitened over the batch), "
        "'reinforce++-baseline' (group mean subtracted first).",
    )
    samples_per_prompt: int = _f(
        1, "Responses per prompt (the group size; >= 2 for the group estimators). rollout_batch_size counts sequences."
    )
    kl_in_reward: bool = _f(True, "Penalize -kl_coef * KL per token in the reward (the classic RLHF shaping).")
    kl_loss_coef: float = _f(
        0.0,
        "Weight of the KL to the reference as a policy-loss term (GRPO style); 0 = off. "
        "The reward's KL stays unless kl_in_reward: false.",
    )
    kl_loss_estimator: str = _f("k3", "KL estimator of the loss term: k3 is unbiased and never negative.")
    critic_lam: float | None = _f(None, "Decoupled GAE: the critic's targets use this lambda (VAPO: 1.0); None = lam.")
    lam_length_alpha: float | None = _f(
        None, "Length-adaptive GAE (VAPO, 0.05): the policy's lambda is 1 - 1/(alpha * length) per sequence."
    )
    value_warmup_steps: int = _f(
        0, "The first steps train only the critic, on rollouts of the initial policy (a shared backbone is frozen)."
    )
    overlong_buffer: int = _f(0, "DAPO: the last tokens before max_new_tokens over which the length penalty grows.")
    overlong_penalty: float = _f(1.0, "DAPO: the score penalty at max_new_tokens (linear from 0 over the buffer).")
    filter_groups: bool = _f(False, "DAPO dynamic sampling: drop groups whose scores are all equal, resample prompts.")
    filter_groups_max_tries: int = _f(10, "Rollouts per step at most when filtering; then equal groups fill the rest.")
    # --- run ----------------------------------------------------------------------------------------------------
    output_dir: str = _f("runs/ppo", "Run directory: metrics.jsonl, TensorBoard logs, checkpoints.")
    steps: int = _f(100, "PPO iterations to run.")
    seed: int = _f(0, "Seed for sampling, shuffling and initialization.")
    save_every: int = _f(0, "Save a checkpoint every this many steps (and at the end); 0 = only at the end.")
    resume_from: str | None = _f(None, "Run directory (latest valid checkpoint) or checkpoint directory to resume.")
    overwrite_output_dir: bool = _f(False, "Allow a fresh run into an output_dir that holds checkpoints.")
    tensorboard: bool = _f(True, "Also log to TensorBoard in <output_dir>/tb.")
    max_skipped_steps: int = _f(5, "Stop after this many consecutive steps skipped for a non-finite loss/gradient.")

    # ------------------------------------------------------------------------------------------------------------

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> PPOConfig:
        unknown = sorted(str(key) for key in values if key not in cls.field_names())
        if unknown:
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise InputError(f"{source}: unknown key(s) {', '.join(short(k) for k in unknown[:5])}{more}")
        hints = typing.get_type_hints(cls)
        # YAML 1.1 reads `1e-5` (no dot) as a string: a float field takes any string that spells a number.
        values = {k: parse_float(v) if float in _options(hints[k]) else v for k, v in values.items()}
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str, overrides: typing.Sequence[str] = ()) -> PPOConfig:
        values = _parse_yaml(_read_config(path), path)
        values = {} if values is None else values
        if not isinstance(values, dict):
            raise InputError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
        for override in overrides:
            key, sep, value = override.partition("=")
            if not sep or not key.strip():
                raise InputError(f"--set {short(override)}: expected key=value")
            values[key.strip()] = _parse_yaml(value, f"--set {clip(key.strip(), 80)}={short(value)}")
        return cls.from_dict(values, source=path)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # --- validation: the one place ---------------------------------------------------------------------------------

    def validate(self, world_size: int | None = None) -> PPOConfig:
        """Check every field; `world_size` (default: torchrun's, 1 without it) is the number of processes."""
        if world_size is None:
            from fastppo.runtime.distributed import world_size as current_world_size

            world_size = current_world_size()
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), hints[f.name])
        self._check_choices()
        self._check_ranges(hints)
        self._check_lists()
        self._check_batches(world_size)
        self._check_estimator(world_size)
        self._check_paths()
        return self

    def _check_choices(self) -> None:
        choices = {
            "critic": ("shared", "separate"),
            "reference": ("copy", "adapter"),
            "reference_quantization": ("none", "8bit", "4bit"),
            "reward_quantization": ("none", "8bit", "4bit"),
            "kl_estimator": KL_ESTIMATORS,
            "loss_agg": LOSS_AGGREGATIONS,
            "lr_scheduler": ("constant", "linear", "cosine"),
            "device": ("auto", "cpu", "cuda"),
            "precision": PRECISIONS,
            "parallel": ("none", "ddp", "fsdp"),
            "save_dtype": ("auto", "float32", "bfloat16", "float16"),
            "rollout_engine": ("hf", "vllm"),
            "rollout_correction": ("none", "tis", "mis"),
            "old_logprobs": ("auto", "rollout", "recompute"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise InputError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.rollout_correction != "none" and self.rollout_engine != "vllm":
            raise InputError(
                "rollout_correction corrects for a separate sampler's log-probs: it needs "
                "rollout_engine: vllm (the hf engine samples from the trained model itself)"
            )
        if self.old_logprobs == "rollout" and self.rollout_engine == "vllm":
            raise InputError(
                "old_logprobs: 'rollout' keeps the hf engine's own log-probs; vLLM's differ from the "
                "trainer's (use recompute, with rollout_correction for the gap)"
            )
        if self.kl_target is not None and not self.kl_in_reward:
            raise InputError(
                "kl_target adapts kl_coef, the KL penalty in the reward; with kl_in_reward: false there "
                "is none to adapt (kl_loss_coef stays fixed): set kl_target: null"
            )
        if self.kl_target is not None and self.kl_coef == 0:
            raise InputError(
                "kl_target scales kl_coef up and down, and kl_coef is 0: it would stay 0; set kl_coef "
                "> 0 (the starting coefficient) or kl_target: null"
            )
        if self.reference == "adapter" and self.lora_rank == 0:
            raise InputError("reference: 'adapter' needs LoRA (lora_rank > 0): without adapters there is no reference")
        if self.reference == "adapter" and self.reference_quantization != "none":
            raise InputError(
                "reference_quantization: the 'adapter' reference is the policy itself with its adapters "
                "off, nothing to quantize (use reference: copy for a quantized copy)"
            )

    def _check_ranges(self, hints: dict) -> None:
        for name, interval in RANGES.items():
            check_range(name, getattr(self, name), interval, nullable=type(None) in _options(hints[name]))

    def _check_lists(self) -> None:
        for i, token_id in enumerate(self.stop_token_ids):
            if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
                raise InputError(f"stop_token_ids[{i}] must be a token id (an integer >= 0), got {short(token_id)}")
        for i, stop in enumerate(self.stop_strings):
            if not isinstance(stop, str) or not stop:
                raise InputError(f"stop_strings[{i}] must be a non-empty string, got {short(stop)}")
        if isinstance(self.prompts, list):
            if not self.prompts:
                raise InputError("prompts: the list is empty")
            for i, prompt in enumerate(self.prompts):
                if not isinstance(prompt, str) or not prompt.strip():
                    raise InputError(f"prompts[{i}] must be a non-empty string, got {short(prompt)}")
        elif self.prompts is not None and not isinstance(self.prompts, str):
            raise InputError(f"prompts must be a JSONL path or a list of strings, got {short(self.prompts)}")

    def _check_batches(self, world_size: int) -> None:
        if self.rollout_batch_size % self.mini_batch_size:
            raise InputError(
                f"mini_batch_size ({self.mini_batch_size}) must divide rollout_batch_size ({self.rollout_batch_size})"
            )
        if world_size > 1:
            if self.parallel == "none":
                raise InputError(f"parallel: 'none' runs one process, but {world_size} were started: use ddp or fsdp")
            for name in ("rollout_batch_size", "mini_batch_size"):  # global sizes: every rank takes an equal share
                if getattr(self, name) % world_size:
                    raise InputError(
                        f"{name} ({getattr(self, name)}) must be a multiple of the number of processes "
                        f"({world_size}): each takes an equal share"
                    )
        mini = self.mini_batch_size // max(world_size, 1)  # one rank's share of a minibatch
        micro = self.micro_batch_size or mini
        if micro <= 0 or mini % micro:
            what = f"mini_batch_size / processes ({mini})" if world_size > 1 else f"mini_batch_size ({mini})"
            raise InputError(f"micro_batch_size ({micro}) must divide {what}")

    def _check_estimator(self, world_size: int) -> None:
        """The advantage estimator's fields: groups that fit the batch (and stay on one rank), critic-only knobs only
        with a critic, DAPO's ranges."""
        from fastppo.ppo.advantages import ADVANTAGE_ESTIMATORS, GROUP_ESTIMATORS, uses_critic

        if self.advantage_estimator not in ADVANTAGE_ESTIMATORS:
            raise InputError(
                f"advantage_estimator must be one of {', '.join(ADVANTAGE_ESTIMATORS)}; "
                f"got {self.advantage_estimator!r}"
            )
        if self.kl_loss_estimator not in KL_ESTIMATORS:
            raise InputError(
                f"kl_loss_estimator must be one of {', '.join(KL_ESTIMATORS)}; got {self.kl_loss_estimator!r}"
            )
        group = self.samples_per_prompt
        per_rank = self.rollout_batch_size // max(world_size, 1)
        if per_rank % group:
            where = f"rollout_batch_size / processes ({per_rank})" if world_size > 1 else "rollout_batch_size"
            raise InputError(
                f"samples_per_prompt ({group}) must divide {where}: a prompt's group of responses is "
                f"sampled, and its statistics taken, on one process"
            )
        if self.advantage_estimator in GROUP_ESTIMATORS and group < 2:
            raise InputError(
                f"advantage_estimator {self.advantage_estimator!r} compares the responses to one prompt: "
                "set samples_per_prompt >= 2"
            )
        if self.filter_groups and group < 2:
            raise InputError("filter_groups drops groups of equal scores: set samples_per_prompt >= 2")
        if not uses_critic(self.advantage_estimator):
            for name in ("critic_lam", "lam_length_alpha"):
                if getattr(self, name) is not None:
                    raise InputError(
                        f"{name} is a GAE setting; advantage_estimator {self.advantage_estimator!r} "
                        "has no critic and no GAE"
                    )
            if self.critic == "separate":
                raise InputError(
                    f"critic: 'separate' builds a second backbone for the values; advantage_estimator "
                    f"{self.advantage_estimator!r} has no critic"
                )
            if self.value_warmup_steps:
                raise InputError(
                    f"value_warmup_steps trains a critic; advantage_estimator {self.advantage_estimator!r} has none"
                )
        if self.value_warmup_steps >= self.steps:
            raise InputError(
                f"value_warmup_steps ({self.value_warmup_steps}) must be < steps ({self.steps}): "
                "the policy would never train"
            )
        if self.overlong_buffer > self.max_new_tokens:
            raise InputError(
                f"overlong_buffer ({self.overlong_buffer}) must be <= max_new_tokens ({self.max_new_tokens})"
            )

    def _check_paths(self) -> None:
        for name in ("policy_model", "tokenizer", "reward_tokenizer"):
            _check_path(name, getattr(self, name))
        if isinstance(self.reward_model, str) and not _is_callable_spec(self.reward_model):
            _check_path("reward_model", self.reward_model)
        if isinstance(self.prompts, str):
            _check_path("prompts", self.prompts, file=True)
        if self.resume_from is not None:
            _check_path("resume_from", self.resume_from)
        check_output_dir("output_dir", self.output_dir)

    @property
    def micro_batch(self) -> int:
        """Sequences per forward/backward on one rank: micro_batch_size, else one rank's share of a minibatch."""
        from fastppo.runtime.distributed import world_size

        return self.micro_batch_size or self.mini_batch_size // world_size()


# The values each numeric field accepts, besides being finite (floats) or fitting in 64 bits (integers).
RANGES: dict[str, Interval] = {
    "lora_rank": NON_NEGATIVE,
    "lora_alpha": POSITIVE,
    "max_prompt_length": POSITIVE,
    "rollout_batch_size": POSITIVE,
    "max_new_tokens": POSITIVE,
    "temperature": POSITIVE,
    "top_k": NON_NEGATIVE,
    "top_p": Interval(0, 1, low_open=True),
    "kl_coef": NON_NEGATIVE,
    "kl_target": POSITIVE,
    "kl_horizon": POSITIVE,
    "missing_eos_penalty": NON_NEGATIVE,
    "reward_clip": POSITIVE,
    "reward_timeout": POSITIVE,
    "gamma": FRACTION,
    "lam": FRACTION,
    "ppo_epochs": POSITIVE,
    "mini_batch_size": POSITIVE,
    "micro_batch_size": POSITIVE,
    "learning_rate": POSITIVE,
    "target_kl": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "warmup_steps": NON_NEGATIVE,
    "max_grad_norm": POSITIVE,
    "clip_range": POSITIVE,
    "clip_range_high": POSITIVE,
    "dual_clip": Interval(1, low_open=True),
    "clip_range_value": POSITIVE,
    "vf_coef": NON_NEGATIVE,
    "entropy_coef": NON_NEGATIVE,
    "steps": POSITIVE,
    "seed": NON_NEGATIVE,
    "save_every": NON_NEGATIVE,
    "max_skipped_steps": NON_NEGATIVE,
    "vllm_gpu_memory_utilization": Interval(0, 1, low_open=True),
    "vllm_max_model_len": POSITIVE,
    "vllm_kv_cache_bytes": POSITIVE,
    "vllm_tensor_parallel_size": POSITIVE,
    "rollout_correction_cap": Interval(1, low_open=True),
    "samples_per_prompt": POSITIVE,
    "filter_groups_max_tries": POSITIVE,
    "kl_loss_coef": NON_NEGATIVE,
    "value_warmup_steps": NON_NEGATIVE,
    "overlong_buffer": NON_NEGATIVE,
    "overlong_penalty": NON_NEGATIVE,
    "critic_lam": FRACTION,
    "lam_length_alpha": POSITIVE,
}


def _read_config(path: str) -> str:
    if not os.path.exists(path):
        raise InputError(f"config file {path} does not exist")
    if not os.path.isfile(path):
        raise InputError(f"config file {path} is not a file")
    if os.path.getsize(path) > MAX_CONFIG_BYTES:
        raise InputError(
            f"config file {path} is {os.path.getsize(path) >> 20} MB: a run config is a few KB (prompts "
            "belong in a JSONL file); is it the right file?"
        )
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8-sig")
    except OSError as error:
        raise InputError(f"config file {path}: cannot read it ({error.strerror or error})") from None
    except UnicodeDecodeError as error:
        raise InputError(
            f"config file {path} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
            f"{error.start}); is it the right file?"
        ) from None


def _parse_yaml(text: str, where: str):
    import yaml

    class Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
        def construct_mapping(self, node, deep=False):
            """PyYAML keeps the last of two equal keys; a config that sets a field twice is refused instead."""
            lines = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden here
                    continue
                key, line = self.construct_object(key_node, deep=deep), key_node.start_mark.line + 1
                if key in lines:  # an unhashable key raises TypeError here: not valid YAML, below
                    raise InputError(f"{where}: {short(key)} is set twice (lines {lines[key]} and {line})")
                lines[key] = line
            return super().construct_mapping(node, deep=deep)

    try:
        return yaml.load(text, Loader=Loader)
    except InputError:
        raise
    except (yaml.YAMLError, ValueError, TypeError, RecursionError) as error:  # the others: from PyYAML's constructors
        problem = "nested too deeply" if isinstance(error, RecursionError) else clip(error)
        raise InputError(f"{where}: not valid YAML ({problem})") from None


def _options(hint) -> tuple:
    """The types a field accepts: the members of a union, else the hint itself."""
    union = typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None))
    return typing.get_args(hint) if union else (hint,)


def _is_callable_spec(spec: str) -> bool:
    """'package.module:function' (and not a Windows-style or existing path)."""
    module, sep, function = spec.partition(":")
    return bool(sep) and function.isidentifier() and not os.path.exists(spec) and "/" not in module


def _check_path(name: str, path, file: bool = False) -> None:
    if path is None:
        return
    if not os.path.exists(path):
        raise InputError(f"{name}: path {path} does not exist")
    if file and not os.path.isfile(path):
        raise InputError(f"{name}: {path} is not a file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{name}: {path} is not readable")


def _check_type(name: str, value, hint) -> None:
    if hint is typing.Any:
        return
    allowed = _options(hint)
    for option in allowed:
        option = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return check_finite(name, value)
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return check_int64(name, value)
        if option not in (float, int, type(None)) and isinstance(value, option):
            return
    names = " or ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in allowed)
    raise InputError(f"{name} must be {names}, got {type(value).__name__} {short(value)}")


def resume_settings(config) -> dict:
    """The PPO settings `check_resume_settings` compares (JSON values)."""
    from fastppo.ppo.advantages import uses_critic

    policy = config.policy_model
    return {
        "critic": config.critic if uses_critic(config.advantage_estimator) else "none",
        "lora_rank": config.lora_rank,
        "learning_rate": config.learning_rate,
        "weight_decay": config.weight_decay,
        "policy_model": os.path.abspath(policy) if isinstance(policy, str) else None,
    }
