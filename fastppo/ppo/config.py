"""PPOConfig: every knob of a fastppo run, in one typed dataclass, validated in one place.

YAML run files mirror these field names (`fastppo train --config run.yaml --set key=value`). `validate()` checks
everything it can before any model is loaded: unknown keys, types, ranges, batch sizes that must divide, paths that
must exist. Every error is an `InputError` that names the field.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

from fastppo.ops.reference import KL_ESTIMATORS, LOSS_AGGREGATIONS
from fastppo.ppo.advantages import ADVANTAGE_ESTIMATORS, GROUP_ESTIMATORS, uses_critic
from fastppo.runtime.config_base import RESUME_FROM_HELP, Config, check_path, check_resume_from, option
from fastppo.runtime.errors import InputError
from fastppo.runtime.precision import PRECISION_HELP, PRECISIONS
from fastppo.runtime.validation import (
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    Interval,
    check_writable_dir,
    is_callable_spec,
    short,
)

# Settings TRL and OpenRLHF users know under other names: a config using one is refused with fastppo's name for it
# (docs/from-trl.md has the whole table).
FOREIGN_KEYS = {
    "num_generations": "use samples_per_prompt (responses per prompt)",
    "n_samples_per_prompt": "use samples_per_prompt",
    "beta": "use kl_loss_coef (the KL as a loss term, GRPO's beta) or kl_coef (the KL penalty in the reward)",
    "init_kl_coef": "use kl_coef",
    "epsilon": "use clip_range",
    "epsilon_high": "use clip_range_high",
    "cliprange": "use clip_range",
    "eps_clip": "use clip_range",
    "cliprange_value": "use clip_range_value",
    "value_clip": "use clip_range_value",
    "max_completion_length": "use max_new_tokens",
    "response_length": "use max_new_tokens",
    "generate_max_len": "use max_new_tokens",
    "prompt_max_len": "use max_prompt_length",
    "num_iterations": "use ppo_epochs",
    "num_ppo_epochs": "use ppo_epochs",
    "num_mini_batches": "use mini_batch_size (sequences per optimizer step)",
    "per_device_train_batch_size": "use micro_batch_size (sequences per forward/backward)",
    "micro_train_batch_size": "use micro_batch_size",
    "train_batch_size": "use mini_batch_size (sequences per optimizer step)",
    "gradient_accumulation_steps": "use mini_batch_size and micro_batch_size (their ratio is the accumulation)",
    "model_name_or_path": "use policy_model",
    "sft_model_path": "use policy_model",
    "reward_model_path": "use reward_model",
    "num_train_epochs": "use steps (PPO iterations)",
    "total_episodes": "use steps (PPO iterations of rollout_batch_size sequences each)",
    "whiten_rewards": "use reward_normalization",
    "stop_token": "use stop_token_ids or stop_strings",
    "stop_token_id": "use stop_token_ids (a list)",
    "loss_type": "use loss_agg (token-mean, seq-mean-token-mean, seq-mean-token-sum)",
    "scale_rewards": "use advantage_estimator: grpo (scaled by the group's std) or dr_grpo (not scaled)",
    "use_vllm": "use rollout_engine: vllm",
    "save_steps": "use save_every",
    "actor_learning_rate": "use learning_rate",
    "logging_steps": "fastppo logs every step",
}


@dataclass
class PPOConfig(Config):
    # --- models -----------------------------------------------------------------------------------------------
    policy_model: str | None = option(None, "Path of the causal LM to train (a Hugging Face checkpoint directory).")
    tokenizer: str | None = option(None, "Tokenizer path; defaults to policy_model.")
    reward_model: str | None = option(
        None, "Path of a 1-label AutoModelForSequenceClassification, or 'module:function' taking (prompts, responses)."
    )
    reward_tokenizer: str | None = option(None, "Reward model tokenizer path; defaults to reward_model.")
    critic: str = option("shared", "'shared': value head on the policy backbone (one model); 'separate': own backbone.")
    reference: str = option(
        "copy", "'copy': a frozen copy of the initial policy; 'adapter': the policy, LoRA disabled."
    )
    reference_quantization: str = option(
        "none", "Load the reference copy 'none', '8bit' or '4bit' (NF4, bitsandbytes)."
    )
    reward_quantization: str = option("none", "Load the reward model 'none', '8bit' or '4bit'.")
    lora_rank: int = option(0, "LoRA rank for the policy; 0 trains every weight.")
    lora_alpha: float = option(16.0, "LoRA scaling numerator (effective scale lora_alpha / lora_rank).")
    save_merged_lora: bool = option(True, "Save LoRA merged into the weights (True) or as an adapter (False).")
    save_dtype: str = option(
        "auto",
        "dtype of the saved policy weights: 'auto' (the checkpoint's own, e.g. bf16), 'float32', 'bfloat16' or "
        "'float16'. Training always updates float32 master weights.",
    )
    gradient_checkpointing: bool = option(
        False, "Recompute activations in the backward: less memory, more time (bench/README.md)."
    )
    fused_logprobs: bool = option(True, "Compute log-probs from hidden states without materializing the logits.")
    device: str = option("auto", "'auto' (CUDA if present), 'cpu' or 'cuda'.")
    precision: str = option("auto", PRECISION_HELP)
    parallel: str = option(
        "ddp",
        "Under torchrun: 'ddp' replicates the policy, 'fsdp' shards it (FSDP2); 'none' refuses several "
        "processes. One process runs unwrapped whatever this says. Batch sizes are global: each rank takes 1/N.",
    )
    # --- data and rollout -------------------------------------------------------------------------------------
    prompts: typing.Any = option(None, "JSONL of {'prompt': ...} or {'messages': [...]} lines, or a list of strings.")
    max_prompt_length: int = option(256, "Prompt tokens kept; longer prompts are cut from the left (see below).")
    truncate_long_prompts: bool = option(
        True,
        "Cut prompts over max_prompt_length from the left, with a warning; "
        "false: refuse at load, naming the first one's file:line.",
    )
    rollout_batch_size: int = option(
        16, "Sequences per PPO iteration: rollout_batch_size / samples_per_prompt prompts."
    )
    max_new_tokens: int = option(64, "Response length limit, in tokens.")
    temperature: float = option(1.0, "Sampling temperature; the log-probs PPO uses are taken at the same temperature.")
    top_k: int = option(0, "Sample from the k most likely tokens only; 0 = off.")
    top_p: float = option(1.0, "Nucleus sampling mass; 1.0 = off.")
    stop_strings: list = option([], "Strings that end a response, besides the end-of-turn tokens.")
    stop_token_ids: list = option(
        [], "Token ids that end a response, besides the tokenizer's EOS and generation_config.json's eos_token_id."
    )
    # --- rollout engine (vLLM) ---------------------------------------------------------------------------------
    rollout_engine: str = option(
        "hf",
        "'hf': fastppo's own decode loop (the reference); 'vllm': an in-process vLLM engine per rank (pip "
        'install "fastppo[vllm]"), its weights synced after every optimizer step.',
    )
    old_logprobs: str = option(
        "auto",
        "Where the old policy's log-probs (and a shared critic's values) come from: 'rollout' keeps those the hf "
        "engine's decode computed for the tokens it sampled (no second pass over the batch; they differ from a "
        "full forward's by float32 rounding, ~1e-6); 'recompute' runs the policy over the batch again; 'auto' = "
        "rollout with the hf engine in float32, recompute under bf16 autocast (`precision`) and with vLLM.",
    )
    vllm_gpu_memory_utilization: float = option(0.3, "CUDA: the fraction of GPU memory vLLM may take (weights + KV).")
    vllm_max_model_len: int | None = option(None, "vLLM's context length; None = max_prompt_length + max_new_tokens.")
    vllm_enable_sleep_mode: bool = option(True, "CUDA: vLLM frees its memory during training, wakes for the rollout.")
    vllm_kv_cache_bytes: int | None = option(
        None,
        "vLLM's KV cache in bytes; None = gpu_memory_utilization on CUDA, 256 MiB on CPU (vLLM's CPU default "
        "takes 16 GiB).",
    )
    vllm_tensor_parallel_size: int = option(1, "GPUs one vLLM engine spans; 1 = each rank generates its own share.")
    rollout_correction: str = option(
        "none",
        "Correct for the sampler's log-probs differing from the trainer's: 'tis' weights each token's "
        "policy-gradient term by min(pi_old / pi_sampler, cap); 'mis' masks sequences whose ratio leaves "
        "[1/cap, cap]; 'none'. Needs rollout_engine: vllm (the hf engine samples from the trainer's own model).",
    )
    rollout_correction_cap: float = option(2.0, "The cap of rollout_correction (> 1): TIS truncation, MIS bounds.")
    # --- reward and KL ----------------------------------------------------------------------------------------
    kl_coef: float = option(0.05, "Initial weight of the per-token KL penalty against the reference.")
    adaptive_kl_target: float | None = option(
        None, "KL per sequence (nats) that adapts kl_coef (Ziegler et al. 2019; OpenRLHF's kl_target); null: fixed."
    )
    kl_horizon: int = option(10000, "Adaptive KL horizon, in episodes: how fast kl_coef moves toward the target.")
    kl_estimator: str = option("k1", "Per-token KL estimator: k1 (log-ratio), k2, k3 (low variance) or abs.")
    missing_eos_penalty: float | None = option(None, "Subtracted from the score of responses that never emit EOS.")
    reward_normalization: bool = option(False, "Divide scores by a running std (and subtract its mean).")
    reward_clip: float | None = option(None, "Clip (normalized) scores to [-reward_clip, reward_clip].")
    reward_timeout: float | None = option(
        600.0,
        "Seconds a reward function may take for one batch before the run stops naming it (exit 2). It runs in a "
        "worker thread, which cannot be killed: the process exits with it. null: no limit, called in the main thread "
        "(for a reward that uses signals itself).",
    )
    # --- advantages and update --------------------------------------------------------------------------------
    gamma: float = option(1.0, "Discount per token; 1.0 is standard for RLHF (the reward comes at the end).")
    lam: float = option(0.95, "GAE lambda: bias/variance trade-off of the advantage estimate.")
    whiten_advantages: bool = option(
        True, "Normalize GAE advantages over the batch (reinforce++ always does; group estimators never need to)."
    )
    ppo_epochs: int = option(1, "Passes over each rollout batch.")
    mini_batch_size: int = option(16, "Sequences per optimizer step; must divide rollout_batch_size.")
    micro_batch_size: int | None = option(None, "Sequences per forward/backward (gradient accumulation); None = mini.")
    learning_rate: float = option(1e-5, "AdamW learning rate.", aliases=("--lr",))
    weight_decay: float = option(0.0, "AdamW weight decay.")
    lr_scheduler: str = option("constant", "'constant', 'linear' or 'cosine' decay after warmup.")
    warmup_steps: int = option(0, "Optimizer steps of linear warmup.")
    max_grad_norm: float | None = option(1.0, "Gradient clipping norm; None = off.")
    target_kl: float | None = option(
        None,
        "Stop a step's updates at the first minibatch whose approx_kl (per token, to "
        "the rollout policy) exceeds this, without its update (SB3); None = off.",
    )
    clip_range: float = option(0.2, "PPO ratio clip epsilon (lower side; also the upper one unless clip_range_high).")
    clip_range_high: float | None = option(None, "Upper ratio clip ('clip-higher'); None = clip_range.")
    dual_clip: float | None = option(None, "Dual-clip constant c > 1 for negative advantages; None = off.")
    clip_range_value: float | None = option(0.2, "Value clip around the old values; None = plain squared error.")
    vf_coef: float = option(0.1, "Weight of the value loss.")
    entropy_coef: float = option(0.0, "Weight of the entropy bonus.")
    loss_agg: str = option("token-mean", "Loss aggregation: token-mean, seq-mean-token-mean or seq-mean-token-sum.")
    # --- advantage estimator: critic-free, VAPO, DAPO --------------------------------------------------------
    advantage_estimator: str = option(
        "gae",
        "'gae' (PPO with a critic), or critic-free (no value head, no critic memory; `critic` is ignored): 'grpo', "
        "'dr_grpo', 'rloo' (group baselines), 'reinforce++' (returns whitened over the batch), "
        "'reinforce++-baseline' (group mean subtracted first).",
    )
    samples_per_prompt: int = option(
        1, "Responses per prompt (the group size; >= 2 for the group estimators). rollout_batch_size counts sequences."
    )
    kl_in_reward: bool = option(True, "Penalize -kl_coef * KL per token in the reward (the classic RLHF shaping).")
    kl_loss_coef: float = option(
        0.0,
        "Weight of the KL to the reference as a policy-loss term (GRPO style); 0 = off. "
        "The reward's KL stays unless kl_in_reward: false.",
    )
    kl_loss_estimator: str = option("k3", "KL estimator of the loss term: k3 is unbiased and never negative.")
    critic_lam: float | None = option(
        None, "Decoupled GAE: the critic's targets use this lambda (VAPO: 1.0); None = lam."
    )
    lam_length_alpha: float | None = option(
        None, "Length-adaptive GAE (VAPO, 0.05): the policy's lambda is 1 - 1/(alpha * length) per sequence."
    )
    value_warmup_steps: int = option(
        0, "The first steps train only the critic, on rollouts of the initial policy (a shared backbone is frozen)."
    )
    overlong_buffer: int = option(0, "DAPO: the last tokens before max_new_tokens over which the length penalty grows.")
    overlong_penalty: float = option(1.0, "DAPO: the score penalty at max_new_tokens (linear from 0 over the buffer).")
    filter_groups: bool = option(
        False, "DAPO dynamic sampling: drop groups whose scores are all equal, resample prompts."
    )
    filter_groups_max_tries: int = option(
        10, "Rollouts per step at most when filtering; then equal groups fill the rest."
    )
    # --- run ----------------------------------------------------------------------------------------------------
    output_dir: str = option("runs/ppo", "Run directory: metrics.jsonl, TensorBoard logs, checkpoints.")
    steps: int = option(100, "PPO iterations to run.")
    seed: int = option(0, "Seed for sampling, shuffling and initialization.")
    save_every: int = option(0, "Save a checkpoint every this many steps (and at the end); 0 = only at the end.")
    resume_from: str | None = option(None, RESUME_FROM_HELP)
    resume_new_reference: bool = option(
        False,
        "On resume, accept a policy_model whose weights differ from those the checkpoint was trained against (the "
        "KL reference): the KL is measured against the new weights from then on. Refused otherwise.",
    )
    overwrite_output_dir: bool = option(False, "Allow a fresh run into an output_dir that holds checkpoints.")
    tensorboard: bool = option(True, "Also log to TensorBoard in <output_dir>/tb.")
    max_skipped_steps: int = option(5, "Stop after this many consecutive steps skipped for a non-finite loss/gradient.")

    # ------------------------------------------------------------------------------------------------------------

    # ------------------------------------------------------------------------------------------------------------

    CHOICES = {
        "critic": ("shared", "separate"),
        "reference": ("copy", "adapter"),
        "reference_quantization": ("none", "8bit", "4bit"),
        "reward_quantization": ("none", "8bit", "4bit"),
        "kl_estimator": KL_ESTIMATORS,
        "kl_loss_estimator": KL_ESTIMATORS,
        "advantage_estimator": ADVANTAGE_ESTIMATORS,
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
    # The values each numeric field accepts, besides being finite (floats) or fitting in 64 bits (integers).
    RANGES = {
        "lora_rank": NON_NEGATIVE,
        "lora_alpha": POSITIVE,
        "max_prompt_length": POSITIVE,
        "rollout_batch_size": POSITIVE,
        "max_new_tokens": POSITIVE,
        "temperature": POSITIVE,
        "top_k": NON_NEGATIVE,
        "top_p": Interval(0, 1, low_open=True),
        "kl_coef": NON_NEGATIVE,
        "adaptive_kl_target": POSITIVE,
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
    RENAMED = {"kl_target": "adaptive_kl_target"}  # its unit (nats per sequence) and role differ from target_kl's
    FOREIGN = FOREIGN_KEYS

    # --- validation: the one place ---------------------------------------------------------------------------------

    def validate(self, world_size: int | None = None) -> PPOConfig:
        """Check every field; `world_size` (default: torchrun's, 1 without it) is the number of processes."""
        if world_size is None:
            from fastppo.runtime.distributed import world_size as current_world_size

            world_size = current_world_size()
        self.check_fields()  # types, CHOICES, RANGES
        self._check_combinations()
        self._check_lists()
        self._check_batches(world_size)
        self._check_estimator(world_size)
        self._check_paths()
        return self

    def _check_combinations(self) -> None:
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
        if self.adaptive_kl_target is not None and not self.kl_in_reward:
            raise InputError(
                "adaptive_kl_target adapts kl_coef, the KL penalty in the reward; with kl_in_reward: false there "
                "is none to adapt (kl_loss_coef stays fixed): set adaptive_kl_target: null"
            )
        if self.adaptive_kl_target is not None and self.kl_coef == 0:
            raise InputError(
                "adaptive_kl_target scales kl_coef up and down, and kl_coef is 0: it would stay 0; set kl_coef "
                "> 0 (the starting coefficient) or adaptive_kl_target: null"
            )
        if self.reference == "adapter" and self.lora_rank == 0:
            raise InputError("reference: 'adapter' needs LoRA (lora_rank > 0): without adapters there is no reference")
        if self.reference == "adapter" and self.reference_quantization != "none":
            raise InputError(
                "reference_quantization: the 'adapter' reference is the policy itself with its adapters "
                "off, nothing to quantize (use reference: copy for a quantized copy)"
            )

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
            check_path(name, getattr(self, name))
        if isinstance(self.reward_model, str) and not is_callable_spec(self.reward_model):
            check_path("reward_model", self.reward_model)
        if isinstance(self.prompts, str):
            check_path("prompts", self.prompts, file=True)
        check_resume_from(self.resume_from, self.output_dir)
        check_writable_dir("output_dir", self.output_dir)

    @property
    def micro_batch(self) -> int:
        """Sequences per forward/backward on one rank: micro_batch_size, else one rank's share of a minibatch."""
        from fastppo.runtime.distributed import world_size

        return self.micro_batch_size or self.mini_batch_size // world_size()


def resume_settings(config) -> dict:
    """The PPO settings `check_resume_settings` compares (JSON values); the trainer adds the digests of the prompts
    and of the reference's weights."""
    return {
        "critic": config.critic if uses_critic(config.advantage_estimator) else "none",
        "lora_rank": config.lora_rank,
        "learning_rate": config.learning_rate,
        "weight_decay": config.weight_decay,
        "kl_coef": config.kl_coef,
        "adaptive_kl_target": config.adaptive_kl_target,
        "kl_horizon": config.kl_horizon,
        "seed": config.seed,
    }
