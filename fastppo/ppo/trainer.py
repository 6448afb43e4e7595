"""PPOTrainer: the PPO-for-RLHF loop, one iteration per `step()`.

    1. rollout              batch = responses of the policy to sampled prompts (samples_per_prompt each; hf or vLLM)
    2. score                batch.scores: the rewards' weighted sum (models and functions), shaped (`shape_scores`)
    3. compute_logprobs     batch.old_logprobs, old_values: the policy's; batch.ref_logprobs: the reference's
    4. shape_rewards        batch.rewards, batch.kl: the score at the last token, -kl_coef * KL on every token
    5. estimate_advantages  batch.advantages, batch.returns: GAE against the values, or a critic-free estimator
    6. ppo_update           ppo_epochs x minibatches of the clipped policy + value losses, one optimizer step each

`step()` runs them in this order, one method each, and times each phase (perf/<phase>_s). Every step after the
rollout has one contract: it fills fields of the batch and returns its statistics (a dict, maybe empty). How the
trainer builds its models is in `setup.py`, how it saves and resumes in `checkpointing.py`.

Every heavy step is an op of `fastppo.ops` (fused kernels where the device has them).
"""

from __future__ import annotations

import math
import os
import sys

import torch

from fastppo import ops
from fastppo.data import as_prompts, tokenize_prompts
from fastppo.engines import vllm as vllm_engine
from fastppo.engines.hf import decode_responses, generate
from fastppo.models import (
    reference_logprobs,
)
from fastppo.ops.reference import loss_weights
from fastppo.ppo import evaluation, groups
from fastppo.ppo.advantages import estimate_advantages
from fastppo.ppo.batch import RolloutBatch, in_row_order, micro_batches, widen
from fastppo.ppo.checkpointing import Checkpointing
from fastppo.ppo.config import PPOConfig
from fastppo.ppo.correction import rollout_correction
from fastppo.ppo.precision_gap import logprob_gap
from fastppo.ppo.setup import SetUp, adopt_peft_config
from fastppo.ppo.shaping import shape_rewards, shape_scores
from fastppo.runtime import distributed, precision, run_lock
from fastppo.runtime.checkpoint import (
    last_checkpoint_note,
)
from fastppo.runtime.errors import InputError
from fastppo.runtime.metrics import PhaseTimer, Stats, explained_variance, peak_memory_mb
from fastppo.runtime.signals import StepInterrupted, stop_at_step_boundary

# The per-token statistics the ops return that are maxima over the tokens, not means (see ops.ppo_policy_loss).
MAX_STATS = ("ratio_max",)
# What the metrics read of a step's batch, gathered from every rank (the KL controller reads kl too).
METRIC_FIELDS = (
    "response_mask",
    "prompt_mask",
    "raw_scores",
    "reward_scores",
    "rewards",
    "kl",
    "old_values",
    "returns",
    "ended",
)


class PPOTrainer(SetUp, Checkpointing):
    def __init__(
        self,
        config: PPOConfig,
        policy=None,
        tokenizer=None,
        reward=None,
        prompts=None,
        reference=None,
        reward_tokenizer=None,
        eval_prompts=None,
        peft_config=None,
    ):
        """`reward`: one reward or a list (TRL's reward_funcs: functions, 'module:function' strings, reward model
        paths or objects), instead of the config's; `reward_tokenizer`: the tokenizer of a reward model object;
        `eval_prompts`: held-out prompts instead of the config's; `peft_config`: a peft LoraConfig, as TRL takes
        it (its settings become the lora_* fields, checked with the others)."""
        self.peft_config = adopt_peft_config(config, peft_config) if peft_config is not None else None
        if eval_prompts is not None:
            config.eval_prompts = eval_prompts
        self.config = config.validate().resolve_model_sources()
        self.uses_reference = config.uses_reference  # False: no reference model, no reference forward
        if config.rollout_engine == "vllm":
            vllm_engine.check_available()  # exit 2 naming the install before any model loads
        # One run per output_dir (run_lock.py), from before anything is written; rank 0 writes for every rank.
        with run_lock.held_by(self, config.output_dir, "train", take=distributed.is_main()):
            self._set_up(policy, tokenizer, reward, prompts, reference, reward_tokenizer)

    # --- the six steps ------------------------------------------------------------------------------------------

    def step(self) -> dict:
        """One PPO iteration; returns (and logs) its metrics. Each step below fills fields of the `RolloutBatch`."""
        self.timer = PhaseTimer()
        batch, stats = self.sample()  # 1-2. generate and score (dynamic sampling may redraw)
        with self.timer("logprobs"):
            stats |= self.compute_logprobs(batch)  # 3. old log-probs and values, reference log-probs
        with self.timer("advantages"):
            stats |= self.shape_rewards(batch)  # 4. the score at the last token, -kl_coef * KL on every token
            stats |= self.estimate_advantages(batch)  # 5. GAE (or a critic-free estimator), whitened
        with self.timer("train"):
            stats |= self.ppo_update(batch)  # 6. ppo_epochs over minibatches of the clipped losses

        warming_up = self.warming_up
        self.step_count += 1
        whole = distributed.gather_fields(batch, METRIC_FIELDS)  # every rank's rows: the same KL and metrics
        kl_per_sequence = None if whole.kl is None else float(whole.kl.sum(-1).mean())  # None: no reference
        if not warming_up and kl_per_sequence is not None:  # warming up, the policy has not moved: nothing to adapt
            self.kl_controller.update(kl_per_sequence, self.config.rollout_batch_size)
        metrics = self._metrics(whole, kl_per_sequence) | stats
        if self.config.value_warmup_steps:
            metrics["value/warmup"] = float(warming_up)
        self._log_completions(batch)
        if self.config.eval_every and self.step_count % self.config.eval_every == 0:
            with self.timer("eval"):
                metrics |= self.evaluate()
            metrics["perf/eval_s"] = self.timer.seconds["eval"]  # not in perf/step_s: the step's phases only
        self.metrics.log(metrics)
        return metrics

    def _log_completions(self, batch: RolloutBatch) -> None:
        """log_completions: this step's prompts, completions and scores to completions.jsonl (and the backends'
        tables), num_completions_to_print of them on the console."""
        if not self.config.log_completions:
            return
        rows = evaluation.completion_rows(batch, batch.raw_scores)
        self.metrics.log_completions(rows, self.step_count, "train")
        if distributed.is_main():
            evaluation.print_completions(rows, self.step_count, self.config.num_completions_to_print)

    def evaluate(self) -> dict:
        """The policy's answers to eval_prompts, scored: the eval/* metrics (see `evaluation.evaluate`); the answers
        go to completions.jsonl. Under torchrun every rank calls it."""
        metrics, rows = evaluation.evaluate(self)
        self.metrics.log_completions(rows, self.step_count, "eval")
        return metrics

    @property
    def warming_up(self) -> bool:
        """The first value_warmup_steps steps train the critic alone, on rollouts of the initial policy."""
        return self.step_count < self.config.value_warmup_steps

    def sample(self) -> tuple[RolloutBatch, dict]:
        """Steps 1-2: prompts drawn samples_per_prompt times each, their responses generated (`rollout`) and scored
        (`score`); with filter_groups, DAPO's dynamic sampling (`groups.dynamic_sampling`). (batch, its stats)"""
        cfg, G = self.config, self.config.samples_per_prompt

        score_stats = {}

        def roll_out() -> RolloutBatch:
            drawn = groups.repeat_each(self.sampler.next_indices(cfg.rollout_batch_size // G), G)
            self.decode_real_frac = None  # the hf engine's, set by `rollout` (vLLM schedules its own tokens)
            with self.timer("rollout"):
                batch = self.rollout([self.prompts[i] for i in distributed.share(drawn)])  # this rank's groups
            if self.decode_real_frac is not None:
                score_stats["perf/rollout_real_frac"] = self.decode_real_frac
            with self.timer("reward"):
                score_stats.update(self.score(batch))
            return batch

        if not cfg.filter_groups:
            return roll_out(), score_stats
        batch, sampling_stats = groups.dynamic_sampling(
            roll_out, G, cfg.filter_groups_max_tries, self.tokenizer.pad_token_id
        )
        return batch, score_stats | sampling_stats

    def rollout(self, prompts: list, temperature: float | None = None) -> RolloutBatch:
        """Step 1: one response per prompt from the current policy (at the config's temperature unless given).
        Prompts are strings, or chat conversations (lists of messages) rendered with the chat template."""
        cfg = self.config
        prompts = as_prompts(prompts, self.tokenizer)
        prompt_ids, prompt_mask = tokenize_prompts(
            prompts, self.tokenizer, cfg.max_prompt_length, cfg.truncate_long_prompts
        )
        prompt_ids, prompt_mask = prompt_ids.to(self.device), prompt_mask.to(self.device)
        temperature = cfg.temperature if temperature is None else temperature
        if self.engine is not None:
            self.engine.sync_from(self.model, self.parallel)  # the weights of the last optimizer step
            sampler_values = None
            response_ids, response_mask, ended, sampler_logprobs = self.engine.generate(
                prompt_ids,
                prompt_mask,
                cfg.max_new_tokens,
                temperature,
                cfg.top_k,
                cfg.top_p,
                tuple(cfg.stop_strings),
                self.end_ids,
                self.tokenizer.pad_token_id,
            )
        else:
            self.model.eval()
            with torch.no_grad(), self._autocast(), self.parallel.full_params(self.model):
                generation = generate(
                    self.model.lm,
                    self.tokenizer,
                    prompt_ids,
                    prompt_mask,
                    cfg.max_new_tokens,
                    temperature,
                    cfg.top_k,
                    cfg.top_p,
                    tuple(cfg.stop_strings),
                    self.end_ids,
                    value_head=self.model.value_head if self.old_logprobs_from_rollout else None,
                    with_logprobs=self.old_logprobs_from_rollout,  # the old log-probs, or nobody's
                )
            self.model.train()
            response_ids, response_mask, ended, sampler_logprobs, sampler_values, decoded = generation
            self.decode_real_frac = float(response_mask.sum()) / max(decoded, 1)
        responses = decode_responses(self.tokenizer, response_ids, response_mask)
        return RolloutBatch(
            prompt_ids,
            prompt_mask,
            response_ids,
            response_mask,
            ended,
            list(prompts),
            responses,
            sampler_logprobs=sampler_logprobs,
            sampler_values=sampler_values,
        )

    def score(self, batch: RolloutBatch) -> dict:
        """Step 2: `batch.reward_scores`, (B, K) what each reward returned (NaN where one does not apply),
        `batch.raw_scores`, (B,) their weighted sum, and `batch.scores`, the scores PPO optimizes (`shape_scores`:
        penalties, normalization, clipping)."""
        self.reward.trainer_state.global_step = self.step_count
        batch.reward_scores = self.reward_scores(batch)
        batch.raw_scores = self.reward.combine(batch.reward_scores)
        batch.scores = shape_scores(batch.raw_scores, batch, self.config, self.score_moments)
        return {}

    def reward_scores(self, batch: RolloutBatch) -> torch.Tensor:
        """(B, K) what each reward returned for `batch` (NaN where one does not apply). Reward models compute in
        the run's precision; reward functions do not notice."""
        with self._autocast():
            return self.reward(batch).to(self.device)

    @torch.no_grad()
    def compute_logprobs(self, batch: RolloutBatch) -> dict:
        """Step 3: `batch.old_logprobs` and `batch.old_values`, and `batch.ref_logprobs`. The old ones are those
        the hf engine's decode computed (`old_logprobs`: rollout), or a forward of the policy over the batch, the
        same as training's. With vLLM, the gap to the sampler's own log-probs and `rollout_correction`'s token
        weights (returns the gap's stats)."""
        cfg, T = self.config, batch.response_ids.shape[1]
        from_rollout = self.old_logprobs_from_rollout and batch.sampler_logprobs is not None
        old_logprobs, old_values, ref_logprobs, order = [], [], [], []
        real = computed = 0
        gap = {}  # precision/logprob_gap, from the first micro-batch with response tokens
        for rows, micro in self._micro_batches(batch, torch.arange(len(batch.prompts))):
            input_ids, attention_mask, P = micro.input_ids, micro.attention_mask, micro.prompt_ids.shape[1]
            real_tokens, computed_tokens = micro.real_and_computed_tokens()
            real, computed = real + real_tokens, computed + computed_tokens
            # FSDP: the LMs are called below without their root's forward, which would unshard the root's weights.
            with self._autocast(), self.parallel.root_params(self.model), self.parallel.root_params(self.reference):
                if self.autocast_dtype is not None and not gap:  # what bf16 changed, once an iteration
                    gap = logprob_gap(self.model, micro, cfg.temperature)
                if not from_rollout:
                    logprobs, _, values = self.model(input_ids, attention_mask, P, cfg.temperature)
                    old_logprobs.append(widen(logprobs, T))
                    old_values.append(widen(values, T))
                if not self.uses_reference:
                    ref = None  # nothing reads it: no reference forward
                else:
                    inputs = (input_ids, attention_mask, P, cfg.temperature, cfg.fused_logprobs)
                    if self.reference is None:  # the policy with its LoRA adapters off
                        with self.model.adapters_disabled() as lm:
                            ref = reference_logprobs(lm, *inputs, self.model.padding_free)
                    else:
                        ref = reference_logprobs(self.reference, *inputs, self.reference_padding_free)
            ref_logprobs.append(widen(ref, T))
            order.append(rows)
        stats = dict(gap)
        if self.uses_reference or not from_rollout:
            stats["perf/logprobs_real_frac"] = real / max(computed, 1)
        batch.ref_logprobs = in_row_order(ref_logprobs, order) if self.uses_reference else None
        if from_rollout:
            batch.old_logprobs, batch.old_values = batch.sampler_logprobs, batch.sampler_values
            return stats
        batch.old_logprobs = in_row_order(old_logprobs, order)
        batch.old_values = in_row_order(old_values, order)  # None: critic-free
        if self.engine is None:
            return stats
        stats |= rollout_correction(batch, cfg)
        stats["perf/weight_sync_s"] = self.engine.last_sync_s
        return stats

    def shape_rewards(self, batch: RolloutBatch) -> dict:
        """Step 4: `batch.rewards` and `batch.kl`, (B, T): see `shaping.shape_rewards`."""
        batch.rewards, batch.kl = shape_rewards(batch, self.config, self.kl_controller.value)
        return {}

    def estimate_advantages(self, batch: RolloutBatch) -> dict:
        """Step 5: `batch.advantages` and `batch.returns`, (B, T): see `advantages.estimate_advantages`."""
        batch.advantages, batch.returns = estimate_advantages(batch, self.config)
        return {}

    def ppo_update(self, batch: RolloutBatch) -> dict:
        """Step 6: ppo_epochs passes over shuffled minibatches; one optimizer step per minibatch, accumulated over
        micro-batches whose losses are normalized by the whole minibatch's token (or sequence) count. Returns the
        statistics averaged over the optimizer steps (maxima: the largest)."""
        cfg, B = self.config, len(batch.prompts)
        mini_batch = cfg.mini_batch_size // distributed.world_size()  # this rank's share of every minibatch
        step_stats, n_updates, early_stopped = Stats(), 0, False
        real = computed = 0  # tokens: the padding the forwards and backwards paid for
        for _ in range(cfg.ppo_epochs):
            if early_stopped:
                break
            for minibatch_rows in torch.randperm(B).split(mini_batch):
                # Counts over the whole minibatch, every rank's share included: the losses' shared denominator.
                n_tokens, n_sequences = distributed.global_counts(batch.response_mask[minibatch_rows.to(self.device)])
                denominator = max(n_tokens if cfg.loss_agg == "token-mean" else n_sequences, 1.0)
                self.optimizer.zero_grad(set_to_none=True)
                stats = Stats()
                micros = [micro for _, micro in self._micro_batches(batch, minibatch_rows)]
                for i, micro in enumerate(micros):
                    token_share = float(micro.response_mask.sum()) / max(n_tokens, 1.0)
                    real_tokens, computed_tokens = micro.real_and_computed_tokens()
                    real, computed = real + real_tokens, computed + computed_tokens
                    with self.parallel.no_sync(last=i == len(micros) - 1):
                        self._micro_step(micro, denominator, token_share, stats)
                stats = distributed.reduce_stats(stats)  # each rank held its share of the sums
                if cfg.target_kl is not None and stats.totals.get("policy/approx_kl", 0.0) > cfg.target_kl:
                    self.optimizer.zero_grad(set_to_none=True)  # the policy has moved far enough: no more updates
                    early_stopped = True
                    break
                if self.warming_up:  # the critic alone moves: drop the policy's (and a shared backbone's) gradients
                    critic = {id(p) for p in self.model.critic_parameters()}
                    for p in self.model.parameters():
                        p.grad = p.grad if id(p) in critic else None
                for name, norm in self._optimizer_step().items():
                    stats.add(name, norm, Stats.MEAN)
                step_stats.update(stats)
                n_updates += 1
        if not n_updates:  # target_kl stopped the first minibatch: its stats stand for this step
            step_stats, n_updates = stats, 1
        averaged = step_stats.averaged(n_updates) | {"perf/train_real_frac": real / max(computed, 1)}
        return averaged | ({"optim/early_stopped": float(early_stopped)} if cfg.target_kl is not None else {})

    def _micro_batches(self, batch: RolloutBatch, rows: torch.Tensor):
        cfg = self.config
        return micro_batches(batch, rows, cfg.micro_batch, cfg.micro_batch_tokens, self.overhead)

    def _micro_step(self, micro: RolloutBatch, denominator: float, token_share: float, stats: Stats) -> None:
        """Forward and backward of one micro-batch; its statistics go into `stats`: the losses are already parts
        of the minibatch's loss (the shared denominator) and add up, the others are token means over the micro-batch
        and count by its share of the minibatch's tokens, maxima stay maxima."""
        cfg = self.config
        with self._autocast():
            logprobs, entropy, values = self.parallel.train_model(
                micro.input_ids, micro.attention_mask, micro.prompt_ids.shape[1], cfg.temperature
            )
        mask = micro.response_mask
        policy_loss, policy_stats = ops.ppo_policy_loss(
            logprobs,
            micro.old_logprobs,
            micro.advantages,
            mask,
            clip_low=cfg.clip_range,
            clip_high=cfg.clip_range_high,
            dual_clip=cfg.dual_clip,
            agg=cfg.loss_agg,
            denominator=denominator,
            ref_logprobs=micro.ref_logprobs if cfg.kl_loss_coef > 0 else None,
            kl_loss_coef=cfg.kl_loss_coef,
            kl_estimator=cfg.kl_loss_estimator,
            token_weights=micro.token_weights,
        )
        entropy_mean = (entropy * mask).sum() / max(float(mask.sum()), 1.0)
        loss = policy_loss
        if cfg.entropy_coef > 0:  # aggregated like the policy loss (loss_agg), over the same denominator
            weights = loss_weights(mask, cfg.loss_agg, denominator, entropy.dtype)  # (B, T)
            loss = loss - cfg.entropy_coef * (entropy * weights).sum()
        # Warm-up: the policy's terms stay in the graph at weight 0, so that every parameter takes part in DDP's
        # gradient all-reduce; ppo_update then drops every gradient but the critic's.
        loss = loss * (0.0 if self.warming_up else 1.0)
        stats.add("policy/loss", policy_loss.item(), Stats.SUM)
        stats.add("policy/entropy", entropy_mean.item(), Stats.MEAN, token_share)
        for name, value in policy_stats.items():
            stats.add(f"policy/{name}", float(value), Stats.MAX if name in MAX_STATS else Stats.MEAN, token_share)
        if values is not None:  # critic-free estimators have no value head
            value_loss, value_stats = ops.ppo_value_loss(
                values,
                micro.old_values,
                micro.returns,
                mask,
                clip=cfg.clip_range_value,
                agg=cfg.loss_agg,
                denominator=denominator,
            )
            loss = loss + cfg.vf_coef * value_loss
            stats.add("value/loss", value_loss.item(), Stats.SUM)
            for name, value in value_stats.items():
                stats.add(f"value/{name.removeprefix('value_')}", float(value), Stats.MEAN, token_share)
        self.parallel.backward(loss)

    def _optimizer_step(self) -> dict[str, float]:
        """Clip, check, step; returns the gradient norms. A non-finite gradient skips the step (counted); too many
        in a row stop the run."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm is not None else float("inf")
        norms = self._group_grad_norms()  # before clipping: what each loss asked for
        grad_norm = float(self.parallel.full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm)))  # global
        norms["optim/grad_norm"] = grad_norm
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_in_a_row += 1
            self.skipped_total += 1
            if self.skipped_in_a_row >= self.config.max_skipped_steps:
                raise FloatingPointError(
                    f"{self.skipped_in_a_row} optimizer steps in a row had a non-finite gradient: stopping. "
                    "Lower learning_rate, enable reward_normalization/reward_clip, or check the reward's scale; "
                    f"{last_checkpoint_note(self.config.output_dir)}"
                )
            return norms
        self.skipped_in_a_row = 0
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # freed until the next backward: the rollout reuses the memory
        self.scheduler.step()
        if self.engine is not None:
            self.engine.stale = True  # its weights are now old: synced before the next rollout
        return norms

    def _group_grad_norms(self) -> dict[str, float]:
        """The gradient norms of the LM's parameters and of the critic's (value head, separate backbone): with a
        shared backbone, a fresh value head's gradient can dominate the joint norm, and clipping then shrinks the
        policy's step. The backbone's gradient, which both losses write, counts as the policy's."""
        norms = {}
        for name, group in self.param_groups.items():
            if not group:  # critic-free: no value parameters, no value metrics
                continue
            grads = [p.grad for p in group if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
            norms[f"{name}/grad_norm"] = float(self.parallel.full_tensor(norm))
        return norms

    # --- metrics, training, generation ------------------------------------------------------------------------

    def _metrics(self, batch, kl_per_sequence) -> dict:
        seconds = self.timer.seconds
        mask = batch.response_mask
        lengths = mask.sum(-1).float()
        tokens = float(mask.sum() + batch.prompt_mask.sum())
        scores = batch.raw_scores
        metrics = {
            "step": self.step_count,
            "reward/score_mean": float(scores.mean()),
            "reward/score_std": float(scores.std()) if scores.numel() > 1 else 0.0,
            "reward/shaped_mean": float(batch.rewards.sum(-1).mean()),
            "rollout/response_length_mean": float(lengths.mean()),
            "rollout/response_length_max": float(lengths.max()),
            "rollout/ended_rate": float(batch.ended.float().mean()),
            "rollout/truncated_rate": float((~batch.ended).float().mean()),
            "kl/coef": self.kl_controller.value if self.config.kl_in_reward else 0.0,  # in the reward
            "kl/loss_coef": self.config.kl_loss_coef,
            "optim/lr": self.scheduler.get_last_lr()[0],
            "optim/skipped_steps": self.skipped_total,
            "perf/rollout_tokens_per_s": float(mask.sum()) / max(seconds["rollout"], 1e-9),
            "perf/train_tokens_per_s": tokens * self.config.ppo_epochs / max(seconds["train"], 1e-9),
            "perf/peak_memory_mb": peak_memory_mb(self.device),
            "perf/step_s": sum(seconds.values()),
        }
        metrics.update({f"perf/{phase}_s": s for phase, s in seconds.items()})
        if kl_per_sequence is not None:  # without a reference there is no KL: absent, not a 0 that looks measured
            metrics["policy/kl"] = kl_per_sequence
        metrics.update(self.reward.stats(batch.reward_scores))  # TRL's rewards/<name>/mean and /std
        if batch.old_values is not None:
            metrics["value/explained_variance"] = explained_variance(batch.old_values, batch.returns, mask)
        return metrics

    def train(self) -> list[dict]:
        """Run until config.steps, saving every save_every steps and at the end. SIGINT/SIGTERM stop the run at the
        next step boundary with a checkpoint (`self.stop_request` says which signal); an exception saves nothing,
        so the last checkpoint stays the last good one."""
        from tqdm.auto import tqdm

        cfg, history = self.config, []
        bar = tqdm(
            total=cfg.steps, initial=self.step_count, desc="ppo", dynamic_ncols=True, disable=not distributed.is_main()
        )
        with stop_at_step_boundary() as self.stop_request:
            # Every rank must stop at the same step (a signal may reach one rank only), or the others wait forever.
            while self.step_count < cfg.steps and not distributed.any_rank(self.stop_request.requested):
                try:
                    metrics = self.step()
                except StepInterrupted as interrupted:  # a signal during a reward function: see signals.py
                    print(f"fastppo: {interrupted}", file=sys.stderr)
                    break
                except InputError as error:  # a reward that failed: the run stops; say what it leaves to resume
                    error.args = (f"{error}; {last_checkpoint_note(cfg.output_dir)}",)
                    raise
                history.append(metrics)
                bar.update(1)
                shown = {"score": metrics["reward/score_mean"], "kl": metrics.get("policy/kl")}  # kl: no reference
                bar.set_postfix({name: f"{value:.3f}" for name, value in shown.items() if value is not None})
                if cfg.save_every and self.step_count % cfg.save_every == 0:
                    self.save()
            bar.close()
            if self.step_count > 0 and (not cfg.save_every or self.step_count % cfg.save_every):
                self.save()
            # The signal may have reached one rank only: every rank reports the same stop. One that came during the
            # last step or the final save stopped nothing: the run is complete.
            signum = distributed.max_over_ranks(self.stop_request.signum or 0)
            self.stop_request.signum = signum if signum and self.step_count < cfg.steps else None
        self.metrics.close()  # flushed and closed; a later step() appends
        return history

    def generate(self, prompts: list, temperature: float | None = None) -> list[str]:
        """Responses of the current policy (sampled at the config's temperature unless given; 0 = greedy) to
        prompt strings or chat conversations (lists of messages, rendered with the chat template). Under FSDP every
        rank calls it (the weights are gathered)."""
        return self.rollout(prompts, temperature).responses

    def _autocast(self):
        return precision.autocast(self.device, self.autocast_dtype)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
