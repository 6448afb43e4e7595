"""PPOConfig: every knob of a fastppo run, in one typed dataclass, validated in one place.

YAML run files mirror these field names (`fastppo train --config run.yaml --set key=value`). `validate()` checks
everything it can before any model is loaded: unknown keys, types, ranges, batch sizes that must divide, paths that
must exist. Every error is an `InputError` that names the field.
"""

from __future__ import annotations

import typing
import warnings
from dataclasses import dataclass

from fastppo.data import SOURCES as PROMPT_SOURCES
from fastppo.data import is_dataset, read_prompt_records
from fastppo.ops.reference import KL_ESTIMATORS, LOSS_AGGREGATIONS
from fastppo.ppo.advantages import ADVANTAGE_ESTIMATORS, GROUP_ESTIMATORS, uses_critic
from fastppo.ppo.trl_keys import FOREIGN_KEYS
from fastppo.runtime.config_base import RESUME_FROM_HELP, Config, check_path, check_resume_from, option
from fastppo.runtime.errors import InputError
from fastppo.runtime.model_sources import is_model_source
from fastppo.runtime.model_sources import resolve as resolve_model_source
from fastppo.runtime.precision import PRECISION_HELP, PRECISIONS
from fastppo.runtime.reporting import check_report_to
from fastppo.runtime.validation import (
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    Interval,
    check_number,
    check_writable_dir,
    is_callable_spec,
    short,
)


@dataclass
class PPOConfig(Config):
    # --- models -----------------------------------------------------------------------------------------------
    policy_model: str | None = option(None, "Path of the causal LM to train (a Hugging Face checkpoint directory).")
    tokenizer: str | None = option(None, "Tokenizer path; defaults to policy_model.")
    reward_model: str | None = option(
        None,
        "Path of a 1-label AutoModelForSequenceClassification, or a 'module:function' reward function (fastppo's "
        "f(prompts, responses) or TRL's f(completions, **kwargs): docs/from-trl.md). Several: reward_funcs.",
    )
    reward_tokenizer: str | None = option(
        None,
        "Tokenizer path of the reward model (in reward_model or reward_funcs); defaults to the model's own directory. "
        "PPOTrainer(reward_tokenizer=...) takes a tokenizer object.",
    )
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
    padding_free: bool | None = option(
        None,
        "Run the policy's, critic's, reference's and reward models' forwards over each micro-batch's real tokens "
        "packed into one row (position_ids restarting per sequence, as TRL's padding_free). null (auto): where the "
        "attention is "
        "flash-attn's varlen kernel; true: wherever the model keeps packed sequences apart (checked at start-up); "
        "false: never. Refused for models with state along the sequence (Mamba, linear attention).",
    )
    device: str = option("auto", "'auto' (CUDA if present), 'cpu' or 'cuda'.")
    precision: str = option("auto", PRECISION_HELP)
    parallel: str = option(
        "ddp",
        "Under torchrun: 'ddp' replicates the policy, 'fsdp' shards it (FSDP2); 'none' refuses several "
        "processes. One process runs unwrapped whatever this says. Batch sizes are global: each rank takes 1/N.",
    )
    # --- data and rollout -------------------------------------------------------------------------------------
    prompts: typing.Any = option(
        None,
        "JSONL of {'prompt': ...} or {'messages': [...]} lines ('prompt' a string or TRL's chat messages), a Parquet "
        "file or save_to_disk directory with those columns, a datasets.Dataset, or a list; every other column of a "
        "row goes to the reward functions.",
    )
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
        "worker thread, which cannot be killed: the process exits with it. One that sets a signal handler "
        "(math-verify's timeouts) is called in the main thread instead, with a warning. null: no limit, every "
        "function called in the main thread.",
    )
    # --- TRL's reward_funcs and datasets (docs/from-trl.md) ---------------------------------------------------------
    reward_funcs: typing.Any = option(
        None,
        "TRL's reward_funcs, instead of reward_model: one or a list of 'module:function' reward functions and "
        "reward model paths (in Python also callables and models), each scoring every response; the score is "
        "their weighted sum. A function returning None for a response does not count there.",
    )
    reward_weights: list | None = option(
        None, "One weight per reward of reward_funcs (TRL's reward_weights); null: 1 each."
    )
    prompts_split: str | None = option(
        None, "The split to read when prompts is a DatasetDict (or a dataset directory saved with splits); null: train."
    )
    # --- advantages and update --------------------------------------------------------------------------------
    gamma: float = option(1.0, "Discount per token; 1.0 is standard for RLHF (the reward comes at the end).")
    lam: float = option(0.95, "GAE lambda: bias/variance trade-off of the advantage estimate.")
    whiten_advantages: bool = option(
        True, "Normalize GAE advantages over the batch (reinforce++ always does; group estimators never need to)."
    )
    ppo_epochs: int = option(1, "Passes over each rollout batch.")
    mini_batch_size: int = option(16, "Sequences per optimizer step; must divide rollout_batch_size.")
    micro_batch_size: int | None = option(
        None, "Sequences per forward/backward at most (gradient accumulation); None = mini_batch_size."
    )
    micro_batch_tokens: int | None = option(
        None,
        "Tokens per forward/backward at most after the rollout (rows x their longest prompt + response, padding "
        "included). Rows of similar length go together either way (on a CPU, cut where padding costs more than a "
        "forward). None: no token cap.",
    )
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
    tensorboard: bool | None = option(
        None, "Deprecated: use report_to (true adds tensorboard to it, false takes it out), with a warning."
    )
    max_skipped_steps: int = option(5, "Stop after this many consecutive steps skipped for a non-finite loss/gradient.")

    # --- what a run reports and leaves: evaluation, logging backends, checkpoints, the final model -------------------
    eval_prompts: typing.Any = option(
        None,
        "Held-out prompts, in the forms `prompts` takes, that the policy answers every eval_every steps: one split "
        "(a DatasetDict's split itself, dataset['test']; prompts_split is the training prompts').",
    )
    eval_every: int = option(
        0, "Evaluate on eval_prompts every this many steps (eval/* metrics, completions.jsonl); 0 = never."
    )
    eval_greedy: bool = option(
        False, "Answer eval_prompts greedily instead of sampling at `temperature` (eval/kl is then not estimated)."
    )
    log_completions: bool = option(
        False, "Also write each training batch's prompts, completions and scores to completions.jsonl (TRL's name)."
    )
    num_completions_to_print: int | None = option(
        None, "With log_completions: print this many of each batch's completions; null = all, 0 = none."
    )
    report_to: list | str = option(
        ["tensorboard"],
        "Where metrics go besides metrics.jsonl (always written): any of tensorboard, wandb, trackio, mlflow "
        '(each through its own library: pip install "fastppo[wandb]" ...); none or [] for metrics.jsonl only.',
    )
    run_name: str | None = option(None, "The run's name in wandb, trackio and mlflow; null = output_dir's name.")
    save_total_limit: int | None = option(
        None, "Keep at most this many checkpoints: the oldest go once a new one is saved and verified; null = all."
    )
    lora_target_modules: list | str | None = option(
        "all-linear",
        "LoRA: the modules that get adapters (peft's target_modules: names, 'all-linear', or null for peft's "
        "default of the architecture).",
    )
    lora_dropout: float = option(
        0.0, "LoRA: dropout on the adapters' input, saved in adapter_config.json; off in fastppo's own forwards."
    )
    lora_modules_to_save: list = option(
        [], "LoRA: modules trained in full and saved beside the adapter (peft's modules_to_save, e.g. [lm_head])."
    )
    critic_model: str | None = option(
        None,
        "critic: separate: initialize the critic from this 1-label sequence classifier (a reward model): its body "
        "is the critic's backbone, its score head the value head. null: a copy of the policy's backbone, new head.",
    )
    measure_kl: bool = option(
        False,
        "Load the reference and log policy/kl (and eval/kl) even with no KL in the reward nor in the loss, as a "
        "diagnostic (the reference's memory and a forward per step); false: then no reference is loaded.",
    )

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
        "micro_batch_tokens": POSITIVE,
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
        "eval_every": NON_NEGATIVE,
        "num_completions_to_print": NON_NEGATIVE,
        "save_total_limit": POSITIVE,
        "lora_dropout": Interval(0, 1, high_open=True),
    }
    RENAMED = {"kl_target": "adaptive_kl_target"}  # its unit (nats per sequence) and role differ from target_kl's
    FOREIGN = FOREIGN_KEYS  # TRL's and OpenRLHF's names: refused with fastppo's (trl_keys.py)

    # --- validation: the one place ---------------------------------------------------------------------------------

    def validate(self, world_size: int | None = None) -> PPOConfig:
        """Check every field; `world_size` (default: torchrun's, 1 without it) is the number of processes."""
        if world_size is None:
            from fastppo.runtime.distributed import world_size as current_world_size

            world_size = current_world_size()
        self.check_fields()  # types, CHOICES, RANGES
        self._check_combinations()
        self._check_rewards()
        self._check_lists()
        self._check_batches(world_size)
        self._check_estimator(world_size)
        self._check_outputs()
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

    def _check_rewards(self) -> None:
        """reward_model or reward_funcs (not both), each reward a spec, a callable or a model; a weight for each."""
        funcs = self.reward_funcs
        if isinstance(funcs, (list, tuple)) and not funcs:
            raise InputError("reward_funcs: the list is empty")
        items = list(funcs) if isinstance(funcs, (list, tuple)) else [] if funcs is None else [funcs]
        for i, spec in enumerate(items):
            where = f"reward_funcs[{i}]" if isinstance(funcs, (list, tuple)) else "reward_funcs"
            if isinstance(spec, str) and not is_callable_spec(spec):
                check_path(where, spec)
            elif not isinstance(spec, str) and not callable(spec):
                raise InputError(
                    f"{where} must be 'module:function', a reward model directory, a function or a model; "
                    f"got {short(spec)}"
                )
        if funcs is not None and self.reward_model is not None:
            raise InputError(
                "reward_model and reward_funcs are both set: list the reward model in reward_funcs (models and "
                "functions mix there, weighted by reward_weights)"
            )
        if self.reward_weights is not None:
            for i, weight in enumerate(self.reward_weights):
                check_number(f"reward_weights[{i}]", weight, Interval())
            count = len(items) if funcs is not None else 1 if self.reward_model is not None else None
            if count is not None and len(self.reward_weights) != count:
                raise InputError(
                    f"reward_weights has {len(self.reward_weights)} weights for {count} rewards: give one per reward"
                )

    def _check_lists(self) -> None:
        for i, token_id in enumerate(self.stop_token_ids):
            if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
                raise InputError(f"stop_token_ids[{i}] must be a token id (an integer >= 0), got {short(token_id)}")
        for i, stop in enumerate(self.stop_strings):
            if not isinstance(stop, str) or not stop:
                raise InputError(f"stop_strings[{i}] must be a non-empty string, got {short(stop)}")
        for name in ("prompts", "eval_prompts"):
            prompts = getattr(self, name)
            if isinstance(prompts, list):
                if not prompts:
                    raise InputError(f"{name}: the list is empty")
                split = self.prompts_split if name == "prompts" else None  # the training prompts' split
                read_prompt_records(prompts, split, name)  # each item checked
            elif prompts is not None and not isinstance(prompts, str) and not is_dataset(prompts):
                raise InputError(f"{name} must be {PROMPT_SOURCES}; got {short(prompts)}")

    def _check_outputs(self) -> None:
        """The last group's fields: evaluation and completions, the reporting backends (the deprecated `tensorboard`
        switch mapped onto report_to, once), LoRA's peft settings, the critic's source."""
        if self.tensorboard is not None:
            warnings.warn(
                f"tensorboard: {str(self.tensorboard).lower()} is deprecated: use report_to (a list of tensorboard, "
                "wandb, trackio, mlflow; [] for metrics.jsonl only); mapped onto it for this run",
                FutureWarning,
                stacklevel=4,
            )
            others = [name for name in check_report_to(self.report_to) if name != "tensorboard"]
            self.report_to, self.tensorboard = (["tensorboard"] if self.tensorboard else []) + others, None
        self.report_to = check_report_to(self.report_to)
        if self.eval_every and self.eval_prompts is None:
            raise InputError(f"eval_every: {self.eval_every} evaluates on eval_prompts, and none are given")
        if self.eval_prompts is not None and not self.eval_every:
            raise InputError("eval_prompts are given but eval_every is 0: set eval_every (steps between evaluations)")
        if self.num_completions_to_print is not None and not self.log_completions:
            raise InputError("num_completions_to_print prints training completions: set log_completions: true")
        targets = self.lora_target_modules
        if targets is not None and not (
            targets and (isinstance(targets, str) or all(isinstance(t, str) and t for t in targets))
        ):
            raise InputError(
                f"lora_target_modules must be 'all-linear' or a list of module names, got {short(targets)}"
            )
        if not all(isinstance(m, str) and m for m in self.lora_modules_to_save):
            raise InputError(
                f"lora_modules_to_save must be a list of module names, got {short(self.lora_modules_to_save)}"
            )
        if self.lora_rank == 0:
            for name, default in (
                ("lora_target_modules", "all-linear"),
                ("lora_dropout", 0.0),
                ("lora_modules_to_save", []),
            ):
                if getattr(self, name) != default:
                    raise InputError(f"{name} is a LoRA setting and lora_rank is 0 (no LoRA): set lora_rank > 0")
        if self.critic_model is not None and self.critic != "separate":
            raise InputError("critic_model initializes a critic of its own: set critic: separate")

    @property
    def uses_reference(self) -> bool:
        """Whether anything reads the reference's log-probs: a KL penalty in the reward, a KL term in the loss, or
        measure_kl. Without any (TRL's GRPO default) no reference is loaded or run."""
        return (self.kl_in_reward and self.kl_coef > 0) or self.kl_loss_coef > 0 or self.measure_kl

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
        for name in ("policy_model", "tokenizer", "reward_tokenizer", "reward_model", "critic_model"):
            value = getattr(self, name)
            if not is_model_source(value) and not (isinstance(value, str) and is_callable_spec(value)):
                check_path(name, value)
        for name in ("prompts", "eval_prompts"):
            if isinstance(getattr(self, name), str):
                check_path(name, getattr(self, name))  # a file, or a dataset directory (save_to_disk)
        check_resume_from(self.resume_from, self.output_dir)
        check_writable_dir("output_dir", self.output_dir)

    def resolve_model_sources(self) -> PPOConfig:
        """Known model names and GGUF files in the model fields, replaced by their converted checkpoint directories
        (`runtime.model_sources`: converted once, then cached)."""
        for name in ("policy_model", "tokenizer", "reward_model", "reward_tokenizer", "critic_model"):
            setattr(self, name, resolve_model_source(getattr(self, name), name))
        return self

    @property
    def micro_batch(self) -> int:
        """Sequences per forward/backward on one rank: micro_batch_size, else one rank's share of a minibatch."""
        from fastppo.runtime.distributed import world_size

        return self.micro_batch_size or self.mini_batch_size // world_size()
