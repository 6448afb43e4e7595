"""How a PPOTrainer is built (`SetUp`, a part of PPOTrainer): one run per output_dir, the tokenizer, prompts and
rewards read and checked before any model loads, then the policy LM with float32 master weights, the check that its
log-probs are those the rollout samples from, the frozen reference, the policy with its value head (and LoRA), the
optimizer, and the state a resume restores."""

from __future__ import annotations

import sys
import warnings

import torch

from fastppo.data import PromptSampler, check_prompt_token_ids, read_prompts, tokenize_prompts
from fastppo.engines import vllm as vllm_engine
from fastppo.engines.hf import end_token_ids, warn_if_truncated_sampling
from fastppo.models import (
    PolicyValueModel,
    add_lora,
    backbone_of,
    check_critic_model,
    check_logprob_path,
    frozen_reference,
    load_critic,
    load_tokenizer,
    load_trainable_lm,
    lora_config,
    resolve_device,
    unwrap,
)
from fastppo.packing import use_packing
from fastppo.ppo.advantages import uses_critic
from fastppo.ppo.rewards import check_columns, load_rewards
from fastppo.ppo.shaping import KLController, RunningMoments
from fastppo.runtime import distributed, precision
from fastppo.runtime.checkpoint import (
    check_resume_settings,
    clear_previous_run,
    load_checkpoint,
    refuse_mixing_runs,
    remove_partial_checkpoints,
    resume_checkpoint,
    saved_settings,
)
from fastppo.runtime.errors import InputError
from fastppo.runtime.metrics import MetricsLogger, PhaseTimer
from fastppo.runtime.micro_batches import forward_overhead
from fastppo.runtime.rng import seed_everything
from fastppo.runtime.schedule import adamw_with_schedule
from fastppo.runtime.validation import short


class SetUp:
    def _set_up(self, policy, tokenizer, reward, prompts, reference, reward_tokenizer) -> None:
        config = self.config
        refuse_mixing_runs(config.output_dir, config.resume_from, config.overwrite_output_dir)
        checkpoint = resume_checkpoint(config.resume_from, config.output_dir, announce=distributed.is_main())
        self.device = distributed.init(resolve_device(config.device))  # under torchrun: join its process group
        seed_everything(config.seed)  # the same seed on every rank: the same initial weights

        policy = policy if policy is not None else config.policy_model
        if policy is None:
            raise InputError("policy_model: no policy given (a path or a model)")
        self.tokenizer = load_tokenizer(tokenizer or config.tokenizer or (policy if isinstance(policy, str) else None))
        if config.critic_model is not None:  # before any model loads
            check_critic_model(config.critic_model, self.tokenizer)
        self.prompts = read_prompts(
            prompts if prompts is not None else config.prompts,
            self.tokenizer,
            config.max_prompt_length,
            config.truncate_long_prompts,
            config.prompts_split,
        )
        self.fingerprints = self._fingerprints(policy, reference, prompts if prompts is not None else config.prompts)
        self.resume_changes = {}  # checked before any model loads; honoured by `_resume`
        if checkpoint:
            self.resume_changes = check_resume_settings(
                checkpoint, self._resume_settings(), config.resume_new_reference, log=_say
            )
        held_out, limits = config.eval_prompts, (config.max_prompt_length, config.truncate_long_prompts)
        self.eval_prompts = (  # one split: prompts_split is the training prompts'
            [] if held_out is None else read_prompts(held_out, self.tokenizer, *limits, None, "eval_prompts")
        )
        columns = dict.fromkeys(name for prompt in self.prompts for name in prompt.columns)  # for reward functions
        self.reward = load_rewards(config, self.tokenizer, self.device, reward, reward_tokenizer, columns, policy)
        self.reward.trainer_state.max_steps = config.steps
        check_columns(self.reward.rewards, self.eval_prompts, "eval_prompts")  # now, not at the first evaluation

        lm = self._load_policy_lm(policy)  # float32 master weights, dropout off
        self.autocast_dtype = self._autocast_dtype(lm, checkpoint)  # None: float32
        self.end_ids = end_token_ids(self.tokenizer, lm, tuple(config.stop_token_ids))
        vocab_size = lm.get_input_embeddings().num_embeddings
        check_prompt_token_ids(self.prompts + self.eval_prompts, self.tokenizer, vocab_size, self.end_ids)
        self._check_logprob_path(lm)
        self.reference = self._build_reference(lm, policy, reference)  # before LoRA wraps `lm` in place
        self.model = self._build_policy(lm)
        self._decide_packing()
        # The decode's own log-probs and values serve as the old ones (see config.old_logprobs): not with a
        # separate critic, whose values need its own backbone's forward.
        wanted = config.old_logprobs == "rollout" or (config.old_logprobs == "auto" and self.autocast_dtype is None)
        self.old_logprobs_from_rollout = wanted and config.rollout_engine == "hf" and self.model.critic_backbone is None
        resume_state = load_checkpoint(checkpoint, self.model) if checkpoint else None  # into the unwrapped model
        # Under torchrun: DDP or FSDP2 (before the optimizer, which must see FSDP2's sharded parameters).
        self.parallel = distributed.Parallel(config.parallel)
        self.model, self.reference = self.parallel.wrap(self.model, self.reference, self.device)
        self.overhead = forward_overhead(self.model)  # what the micro-batch planner weighs a forward against
        if distributed.world_size() > 1:
            seed_everything(config.seed + distributed.rank())  # each rank samples its own responses
        updates_per_step = config.ppo_epochs * config.rollout_batch_size // config.mini_batch_size
        self.optimizer, self.scheduler = adamw_with_schedule(
            self.model.parameters(),
            config.learning_rate,
            config.steps * updates_per_step,
            config.weight_decay,
            config.warmup_steps,
            config.lr_scheduler,
        )
        self.kl_controller = KLController(config.kl_coef, config.adaptive_kl_target, config.kl_horizon)
        self.score_moments = RunningMoments()
        self.sampler = PromptSampler(len(self.prompts), config.seed)
        self.step_count = 0
        self.exported: set[str] = set()  # save_model's folders: this trainer may replace them
        self.timer = PhaseTimer()  # the current step's phases (`step` starts a new one)
        self.skipped_in_a_row = self.skipped_total = 0
        self.param_groups = {"policy": [], "value": []}  # trainable parameters, for the gradient norms
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                self.param_groups["value" if "value_head" in name or "critic_backbone" in name else "policy"].append(p)

        if distributed.is_main():
            warn_if_truncated_sampling(config.top_k, config.top_p)
        resume_step = self._resume(checkpoint, resume_state) if checkpoint else None
        # The vLLM engine starts from the policy's files; resumed weights are pushed before the first rollout.
        self.engine = (
            vllm_engine.build_engine(policy, config, self.device, self.autocast_dtype)
            if config.rollout_engine == "vllm"
            else None
        )
        if self.engine is not None:
            self.engine.stale = checkpoint is not None
        if distributed.is_main():
            clear_previous_run(config.output_dir, config.resume_from, config.overwrite_output_dir)
            remove_partial_checkpoints(config.output_dir)
        self.metrics = (
            MetricsLogger(
                config.output_dir, config.report_to, resume_step is not None, config.run_name, dict(vars(config))
            )
            if distributed.is_main()
            else distributed.NullLogger()
        )
        if resume_step is not None:
            self.metrics.truncate_after(resume_step)

    def _load_policy_lm(self, policy):
        """The policy LM with float32 master weights (see `load_trainable_lm`); checkpoints are saved back in the
        dtype it came in unless `save_dtype` says otherwise."""
        lm, self.checkpoint_dtype = load_trainable_lm(policy, self.device)
        self.save_dtype = (
            self.checkpoint_dtype if self.config.save_dtype == "auto" else getattr(torch, self.config.save_dtype)
        )
        return lm

    def _autocast_dtype(self, lm, checkpoint: str | None) -> torch.dtype | None:
        """`precision` here: 'auto' on a CPU probes the policy's shapes (runtime.precision), and under torchrun
        takes bf16 only where every rank measured it faster, so that all ranks compute alike. A resumed run keeps
        what its start chose: a probe is a timing, and a run must not change precision halfway."""
        config = self.config
        recorded = saved_settings(checkpoint).get("computed_in") if checkpoint else None
        kept = precision.kept_on_resume(config.precision, self.device, recorded)
        if kept is not False:
            _say(f"precision auto: {recorded}, as the run chose at its start ({checkpoint})")
            return kept
        dtype = precision.autocast_dtype(config.precision, self.device, lm)
        probed = config.precision == "auto" and self.device.type == "cpu"
        if probed and distributed.any_rank(dtype is None):
            dtype = None
        if probed:
            _say(precision.describe(config.precision, dtype, self.device, lm))
        return dtype

    def _decide_packing(self) -> None:
        """padding_free (fastppo.packing): whether the policy's, the critic's and the reference's forwards run packed,
        each model checked on its own (a refused one warns and stays on trimmed micro-batches)."""
        padding_free, model = self.config.padding_free, self.model
        model.padding_free = use_packing(padding_free, unwrap(model.lm), backbone_of(model.lm))
        if model.critic_backbone is not None:
            model.critic_padding_free = use_packing(padding_free, model.critic_backbone, model.critic_backbone)
        reference = self.reference  # None: the policy with its adapters off, packed as the policy is
        self.reference_padding_free = model.padding_free
        if reference is not None:
            self.reference_padding_free = use_packing(padding_free, unwrap(reference), backbone_of(reference))

    def _check_logprob_path(self, lm) -> None:
        """The log-probs PPO trains on must be those the rollout samples from (see `check_logprob_path`). The check
        is of the architecture's logit transform, not of the precision: it runs in float32 whatever `precision` says,
        where the two paths agree to rounding; under bf16 autocast a deep model's rounding alone (SmolLM2-135M's
        30 layers) outgrew the tolerance, which must stay small to catch a transform."""
        length = min(self.config.max_prompt_length, 32)  # cut short for speed, not by the user's setting: no warning
        ids, mask = tokenize_prompts(self.prompts[:4], self.tokenizer, length, warn=False)
        was_training = lm.training
        lm.eval()
        check_logprob_path(lm, ids.to(self.device), mask.to(self.device), self.config.fused_logprobs, tolerance=1e-3)
        lm.train(was_training)

    def _build_policy(self, lm) -> PolicyValueModel:
        cfg = self.config
        if cfg.gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora_rank > 0:
            settings = (cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules, cfg.lora_dropout)
            lora = self.peft_config or lora_config(*settings, cfg.lora_modules_to_save)
            lm = add_lora(lm, cfg.lora_rank, cfg.lora_alpha, lora)
        critic = cfg.critic if uses_critic(cfg.advantage_estimator) else "none"  # critic-free: no value head
        critic_init = load_critic(cfg.critic_model, self.device) if cfg.critic_model else None
        model = PolicyValueModel(lm, critic=critic, fused_logprobs=cfg.fused_logprobs, critic_init=critic_init)
        model.train()
        return model

    def _build_reference(self, lm, policy, reference):
        """The frozen reference LM (see `frozen_reference`), or None when it is the policy with LoRA adapters
        disabled, or when nothing reads it (no KL in the reward nor in the loss: `PPOConfig.uses_reference`).
        `lm` is the loaded policy before LoRA is added: its weights are the reference's."""
        if not self.uses_reference:
            if reference is not None or self.config.reference_quantization != "none":
                warnings.warn(
                    "reference: not loaded, nothing uses it (no KL in the reward: kl_coef 0 or kl_in_reward false; "
                    "none in the loss: kl_loss_coef 0); measure_kl: true keeps it to log the KL",
                    stacklevel=3,
                )
            return None
        if self.config.reference == "adapter":
            return None
        given = reference if reference is not None and not isinstance(reference, str) else None
        return frozen_reference(
            reference or policy, lm, self.config.reference_quantization, self.device, self.checkpoint_dtype, given
        )


def adopt_peft_config(config, peft_config):
    """A peft `LoraConfig` passed as TRL takes it (`PPOTrainer(config, peft_config=...)`): its settings become the
    config's lora_* fields (validated, logged and checked on resume like YAML ones); a lora_* field the config sets
    to something else is refused rather than silently overridden. Returns the copy fastppo wraps the policy with
    (task_type CAUSAL_LM)."""
    import copy

    from peft import LoraConfig

    if not isinstance(peft_config, LoraConfig):
        raise InputError(
            f"peft_config: a {type(peft_config).__name__}; fastppo trains LoRA adapters: pass a LoraConfig"
        )
    task = getattr(peft_config.task_type, "value", peft_config.task_type)
    if task not in (None, "CAUSAL_LM"):
        raise InputError(f"peft_config: task_type {task!r}, but the policy is a causal LM: use task_type='CAUSAL_LM'")
    peft_config = copy.deepcopy(peft_config)
    peft_config.task_type = "CAUSAL_LM"
    targets = peft_config.target_modules
    values = {
        "lora_rank": peft_config.r,
        "lora_alpha": float(peft_config.lora_alpha),
        "lora_dropout": float(peft_config.lora_dropout),
        "lora_target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
        "lora_modules_to_save": list(peft_config.modules_to_save or []),
    }
    defaults = type(config)()
    for name, value in values.items():
        current = getattr(config, name)
        if current != getattr(defaults, name) and current != value:
            raise InputError(
                f"{name}: {short(current)} in the config, {short(value)} in peft_config: give LoRA's settings once "
                "(peft_config, or the lora_* fields)"
            )
        setattr(config, name, value)
    return peft_config


def _say(message: str) -> None:
    """A note about the run, from rank 0 only."""
    if distributed.is_main():
        print(message, file=sys.stderr)
