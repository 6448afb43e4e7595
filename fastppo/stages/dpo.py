"""`fastppo dpo`: Direct Preference Optimization (Rafailov et al. 2023) on {"prompt", "chosen", "rejected"} JSONL.

DPO trains the policy straight on preference pairs, with no reward model and no rollouts. With
h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)] (y_w chosen, y_l rejected, sequence
log-probs summed over the response tokens), the per-pair losses are

    sigmoid           -log sigmoid(beta h)                                      DPO, eq. 7 of the paper
    label_smoothing   -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)  conservative DPO: labels flipped
                                                                                 with probability eps
    ipo               (h - 1 / (2 beta))^2                                      IPO (Azar et al. 2023, eq. 17),
                                                                                 on length-averaged log-probs

and beta * [log pi(y|x) - log ref(y|x)] is the implicit reward of y (the `rewards/` metrics). The reference is
the starting model, frozen (`reference_quantization` 8bit/4bit loads a quantized copy); with LoRA it is the policy
with its adapters disabled, at no extra memory. Its log-probs are computed once per pair before training and
cached (in the checkpoint too): the reference never runs in the training loop.

A pair is encoded as `fastppo sft` encodes an example: the prompt (as PPO encodes it) + the response + EOS, cut
at max_length. Log-probs come from the backbone's final hidden states through `ops.linear_token_logprobs`, so the
(2B, T, V) logits are never materialized. Evaluation, every `eval_every` steps, reports the held-out pairs' loss,
accuracy and margin, and KL(policy || reference) per sequence estimated on responses sampled from the policy for
held-out prompts: the mean of sum_t [log pi - log ref] over the samples (unbiased; the same k1 estimate PPO logs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import types

import torch
import torch.nn.functional as F

from fastppo.data import tokenize_prompts
from fastppo.engines.hf import decode_responses, generate
from fastppo.models import (
    add_lora,
    backbone_of,
    final_hidden,
    frozen_reference,
    load_tokenizer,
    load_trainable_lm,
    resolve_device,
    response_logprobs,
)
from fastppo.runtime import precision, run_lock
from fastppo.runtime.checkpoint import (
    clear_previous_run,
    load_checkpoint,
    refuse_mixing_runs,
    remove_partial_checkpoints,
    resume_checkpoint,
    save_checkpoint,
)
from fastppo.runtime.errors import InputError
from fastppo.runtime.metrics import MetricsLogger, peak_memory_mb
from fastppo.runtime.micro_batches import forward_overhead, sorted_micro_batches
from fastppo.runtime.model_sources import resolve as resolve_model_source
from fastppo.runtime.schedule import adamw_with_schedule
from fastppo.runtime.signals import stop_at_step_boundary
from fastppo.runtime.validation import located, read_records
from fastppo.stages.common import (
    count_steps,
    encode_prompt_response,
    optimizer_step,
    shuffled_batches,
    split_pairs,
    stopped,
    without_ties,
)
from fastppo.stages.dpo_config import DPOConfig

FIELDS = ("prompt", "chosen", "rejected")
STATE_KEYS = ("step", "total_steps", "train_pairs", "optimizer", "scheduler", "reference_logps")  # see `save`
_KL_SEED = 1234  # the same dice at every evaluation, so the KL curve moves with the policy only


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards), each (B,), from four (B,) sequence log-probs.

    The rewards beta * (log pi - log ref) are detached. For 'ipo' pass length-averaged log-probs (as TRL does).
    """
    chosen_logratio = policy_chosen - reference_chosen  # (B,)
    rejected_logratio = policy_rejected - reference_rejected
    h = chosen_logratio - rejected_logratio
    if loss == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    elif loss in ("sigmoid", "label_smoothing"):
        eps = label_smoothing if loss == "label_smoothing" else 0.0
        losses = -(1.0 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    else:
        raise ValueError(f"loss must be one of sigmoid, ipo, label_smoothing; got {loss!r}")
    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


# ----------------------------------------------------------------------------------------------
# data: pairs -> token ids -> [left-padded prompt | right-padded response] batches
# ----------------------------------------------------------------------------------------------


def read_pairs(source) -> list[dict[str, str]]:
    """Preference pairs from a JSONL path (errors name the file and line) or a list of dicts."""
    if isinstance(source, str):
        return read_records(source, FIELDS)
    for i, record in enumerate(source):
        if not isinstance(record, dict):
            raise InputError(f"data[{i}]: expected a dict with fields {list(FIELDS)}")
        for field in FIELDS:
            if not isinstance(record.get(field), str):
                raise InputError(
                    f'data[{i}]: field "{field}" {"is missing" if field not in record else "must be a string"}'
                )
    if not source:
        raise InputError("data: no pairs")
    return [located({field: pair[field] for field in FIELDS}, f"data[{i}]") for i, pair in enumerate(source)]


def encode_pairs(
    tokenizer, pairs: list[dict[str, str]], max_length: int, what: str = ""
) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt ids, chosen response ids, rejected response ids) per pair; pairs with no response token left after
    cutting at max_length are dropped (their loss would be 0 whatever the policy), and counted on stdout."""
    encoded, dropped = [], []
    for pair in pairs:
        chosen, n_prompt = encode_prompt_response(tokenizer, pair["prompt"], pair["chosen"], max_length)
        rejected, _ = encode_prompt_response(tokenizer, pair["prompt"], pair["rejected"], max_length)
        if min(len(chosen), len(rejected)) > n_prompt:
            encoded.append((chosen[:n_prompt], chosen[n_prompt:], rejected[n_prompt:]))
        else:
            dropped.append(pair)
    if dropped:
        print(
            f"fastppo dpo: {len(dropped)} of {len(pairs)} {what} pairs dropped: their prompt fills max_length="
            f"{max_length}, leaving no response token (the first: {dropped[0].where})"
        )
    return encoded


def pack(rows: list[tuple[list[int], list[int]]], pad_id: int):
    """(input_ids (R, P + T), attention_mask (R, P + T), response_mask (R, T), P) from (prompt, response) ids:
    prompts left-padded to P, responses right-padded to T, so hidden[:, P - 1 : -1] predicts every response token."""
    P, T = max(len(p) for p, _ in rows), max(len(r) for _, r in rows)
    input_ids = torch.full((len(rows), P + T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), P + T), dtype=torch.long)
    for i, (prompt, response) in enumerate(rows):
        input_ids[i, P - len(prompt) : P + len(response)] = torch.tensor(prompt + response)
        attention_mask[i, P - len(prompt) : P + len(response)] = 1
    return input_ids, attention_mask, attention_mask[:, P:], P


def sequence_logprobs(lm, input_ids, attention_mask, response_mask, P: int, fused: bool) -> torch.Tensor:
    """(R,) float32 sum of the response tokens' log-probs under `lm`, from its final hidden states."""
    hidden = final_hidden(backbone_of(lm), input_ids, attention_mask)[:, P - 1 : -1]  # (R, T, H)
    logprobs, _ = response_logprobs(lm, hidden, input_ids[:, P:], 1.0, fused)  # (R, T)
    return logprobs.masked_fill(response_mask == 0, 0.0).sum(-1)


# ----------------------------------------------------------------------------------------------
# the trainer
# ----------------------------------------------------------------------------------------------


class DPOTrainer:
    def __init__(self, config: DPOConfig, model=None, tokenizer=None, pairs=None, kl_prompts=None):
        """`model` / `tokenizer` / `pairs` override the config's paths (objects allowed); `kl_prompts` are the
        prompts the KL estimate samples (default: the held-out pairs' prompts)."""
        overrides = {"model": model, "data": pairs}
        config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
        self.config = config.validate()
        with run_lock.held_by(self, config.output_dir, "dpo"):  # one run per output_dir, before anything is written
            self._set_up(tokenizer, kl_prompts)

    def _set_up(self, tokenizer, kl_prompts) -> None:
        config = self.config
        refuse_mixing_runs(config.output_dir, config.resume_from, config.overwrite_output_dir)
        pairs = without_ties(read_pairs(config.data))  # every input check before the model loads
        config.model = resolve_model_source(config.model, "model")  # a known name or a GGUF file: a directory
        self.device = resolve_device(config.device)
        torch.manual_seed(config.seed)
        source = tokenizer or config.tokenizer or (config.model if isinstance(config.model, str) else None)
        if source is None:
            raise InputError("tokenizer: a model object needs a tokenizer (a path or the object)")
        self.tokenizer = load_tokenizer(source, need_eos=True)  # one with an EOS: every encoded response ends with it
        train_pairs, eval_pairs = split_pairs(pairs, config.eval_fraction, config.seed)
        self.train_data = encode_pairs(self.tokenizer, train_pairs, config.max_length, "training")
        self.eval_data = encode_pairs(self.tokenizer, eval_pairs, config.max_length, "held-out")
        if not self.train_data:
            raise InputError(f"data: no training pair keeps a response token within max_length={config.max_length}")
        self.kl_prompts = list(kl_prompts or dict.fromkeys(p["prompt"] for p in eval_pairs))
        self.total_steps = count_steps(len(self.train_data), config.batch_size, config.epochs)

        checkpoint = resume_checkpoint(config.resume_from, config.output_dir)
        self.lm, self.reference = self._build_models(config.model)
        self.overhead = forward_overhead(self.lm)  # see runtime.micro_batches
        state = load_checkpoint(checkpoint, self._saveable(), STATE_KEYS) if checkpoint else None
        self.autocast_dtype = self._autocast_dtype(checkpoint, state)  # None: float32
        self.optimizer, self.scheduler = adamw_with_schedule(
            self.lm.parameters(), config.learning_rate, self.total_steps
        )
        self.batches = shuffled_batches(len(self.train_data), config.batch_size, self.total_steps, config.seed)
        self.step_count = 0
        if state is not None:
            self._resume(checkpoint, state)
        else:
            self.reference_logps = {
                "train": self._reference_logps(self.train_data),
                "eval": self._reference_logps(self.eval_data),
            }
        if not (config.kl_samples and self.kl_prompts) and self.reference is not None:
            self.reference = None  # cached log-probs are all training needs: free the copy
        clear_previous_run(config.output_dir, config.resume_from, config.overwrite_output_dir)
        remove_partial_checkpoints(config.output_dir)
        report_to = ["tensorboard"] if config.tensorboard else []
        self.metrics = MetricsLogger(config.output_dir, report_to, append=state is not None)
        if state is not None:
            self.metrics.truncate_after(self.step_count)

    # --- setup ----------------------------------------------------------------------------------------------------

    def _build_models(self, source):
        """(policy LM, frozen reference LM or None when it is the policy with its LoRA adapters disabled)."""
        cfg = self.config
        # float32 master weights whatever the checkpoint's dtype, dropout off: the policy's and the reference's
        # log-probs of the same text must agree at step 0
        lm, self.checkpoint_dtype = load_trainable_lm(source, self.device)
        reference = None
        if cfg.lora_rank > 0:
            lm = add_lora(lm, cfg.lora_rank, cfg.lora_alpha)
        else:
            reference = frozen_reference(source, lm, cfg.reference_quantization, self.device, self.checkpoint_dtype)
        lm.train()
        return lm, reference

    def _autocast_dtype(self, checkpoint: str | None, state: dict | None) -> torch.dtype | None:
        """`precision` here: 'auto' on a CPU probes the model's shapes (runtime.precision); a resumed run keeps
        what its start chose."""
        config = self.config
        kept = precision.kept_on_resume(config.precision, self.device, state and state.get("computed_in"))
        if kept is not False:
            print(f"fastppo dpo: precision auto: {state['computed_in']}, as the run chose at its start ({checkpoint})")
            return kept
        dtype = precision.autocast_dtype(config.precision, self.device, self.lm)
        if config.precision == "auto" and self.device.type == "cpu":
            print(f"fastppo dpo: {precision.describe(config.precision, dtype, self.device, self.lm)}")
        return dtype

    @contextlib.contextmanager
    def _reference_lm(self):
        if self.reference is not None:
            yield self.reference
        else:
            with self.lm.disable_adapter():
                yield self.lm

    def _saveable(self):
        return types.SimpleNamespace(lm=self.lm)  # checkpoint.py's model: an `.lm`, and no critic

    def _autocast(self):
        return precision.autocast(self.device, self.autocast_dtype)

    # --- log-probs --------------------------------------------------------------------------------------------

    def _logps(self, lm, pairs) -> tuple[torch.Tensor, torch.Tensor]:
        """((2B,) sequence log-probs, (2B,) response lengths): rows [0, B) chosen, [B, 2B) rejected, one forward."""
        rows = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
        input_ids, attention_mask, response_mask, P = pack(rows, self.tokenizer.pad_token_id)
        input_ids, attention_mask, response_mask = (
            t.to(self.device) for t in (input_ids, attention_mask, response_mask)
        )
        with self._autocast():
            logps = sequence_logprobs(lm, input_ids, attention_mask, response_mask, P, self.config.fused_logprobs)
        return logps, response_mask.sum(-1).float()

    @torch.no_grad()
    def _reference_logps(self, data) -> torch.Tensor:
        """(N, 2) reference sequence log-probs [chosen, rejected] per pair, on the CPU: the cache."""
        out = []
        with self._reference_lm() as reference:
            for start in range(0, len(data), self.config.batch_size):
                batch = data[start : start + self.config.batch_size]
                logps, _ = self._logps(reference, batch)
                out.append(logps.view(2, len(batch)).T.cpu())
        return torch.cat(out) if out else torch.zeros(0, 2)

    def _pair_loss(self, pairs, reference_logps: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Mean loss over `pairs` (differentiable) and its detached stats; reference_logps (B, 2) from the cache."""
        cfg, B = self.config, len(pairs)
        logps, lengths = self._logps(self.lm, pairs)
        reference = reference_logps.to(logps.device).T.reshape(-1)  # (2B,) in the same [chosen | rejected] order
        if cfg.loss == "ipo":  # IPO's target margin 1/(2 beta) is on a per-token scale
            logps, reference = logps / lengths, reference / lengths
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            logps[:B], logps[B:], reference[:B], reference[B:], cfg.beta, cfg.loss, cfg.label_smoothing
        )
        margin = chosen_rewards - rejected_rewards
        stats = {
            "policy/loss": float(losses.detach().mean()),
            "rewards/chosen": float(chosen_rewards.mean()),
            "rewards/rejected": float(rejected_rewards.mean()),
            "rewards/margin": float(margin.mean()),
            "rewards/accuracy": float((margin > 0).float().mean()),
            "logps/chosen": float(logps[:B].detach().mean()),
            "logps/rejected": float(logps[B:].detach().mean()),
        }
        return losses.mean(), stats

    # --- the loop ---------------------------------------------------------------------------------------------

    def step(self) -> dict:
        """One optimizer step on the next batch of pairs (and an evaluation when one is due); logs its metrics."""
        if self.step_count >= self.total_steps:
            raise RuntimeError(f"the run is complete: all {self.total_steps} steps (epochs x pairs / batch_size) done")
        start = time.perf_counter()
        rows = next(self.batches)
        pairs, reference_logps = [self.train_data[i] for i in rows], self.reference_logps["train"][rows]
        metrics = {}
        # Pairs of similar length together; each micro-batch's mean loss and stats weigh by its share of the pairs.
        lengths = [len(p) + max(len(c), len(r)) for p, c, r in pairs]
        cfg = self.config
        for chunk in sorted_micro_batches(lengths, cfg.micro_batch_size, cfg.micro_batch_tokens, self.overhead):
            loss, stats = self._pair_loss([pairs[i] for i in chunk], reference_logps[chunk])
            share = len(chunk) / len(pairs)
            (loss * share).backward()
            for name, value in stats.items():
                metrics[name] = metrics.get(name, 0.0) + value * share
        optimizer_step(self.lm, self.optimizer, self.scheduler)
        self.step_count += 1
        seconds = time.perf_counter() - start
        tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in pairs)
        metrics.update(
            {
                "step": self.step_count,
                "lr": self.scheduler.get_last_lr()[0],
                "time/step_s": seconds,
                "perf/tokens_per_s": tokens / max(seconds, 1e-9),
                "perf/peak_memory_mb": peak_memory_mb(self.device),
            }
        )
        every = self.config.eval_every
        if (every and self.step_count % every == 0) or self.step_count == self.total_steps:
            metrics.update(self.evaluate())
        self.metrics.log(metrics)
        return metrics

    def train(self) -> list[dict]:
        """Run to the end (epochs x pairs / batch_size steps), saving every save_every steps and at the end.
        SIGINT/SIGTERM stop at the next step boundary with a checkpoint (`self.stop_request` says which)."""
        from tqdm.auto import tqdm

        cfg, history = self.config, []
        bar = tqdm(total=self.total_steps, initial=self.step_count, desc="dpo", dynamic_ncols=True)
        with stop_at_step_boundary() as self.stop_request:
            while self.step_count < self.total_steps and not self.stop_request.requested:
                metrics = self.step()
                history.append(metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['policy/loss']:.3f}", margin=f"{metrics['rewards/margin']:.3f}")
                if cfg.save_every and self.step_count % cfg.save_every == 0:
                    self.save()
            bar.close()
            if self.step_count > 0 and (not cfg.save_every or self.step_count % cfg.save_every):
                self.save()
            if self.step_count >= self.total_steps:  # a signal during the last step stopped nothing
                self.stop_request.signum = None
        self.metrics.close()  # flushes the files and ends TensorBoard's writer; a later record reopens to append
        return history

    # --- evaluation ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict:
        """eval/ metrics: the held-out pairs' loss, accuracy and margin; the sampled KL to the reference."""
        metrics: dict = {}
        if self.eval_data:
            sums: dict = {}
            for start in range(0, len(self.eval_data), self.config.batch_size):
                batch = self.eval_data[start : start + self.config.batch_size]
                _, stats = self._pair_loss(batch, self.reference_logps["eval"][start : start + len(batch)])
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v * len(batch)
            n = len(self.eval_data)  # eval/loss, eval/rewards_accuracy, ...
            metrics.update({f"eval/{k.removeprefix('policy/').replace('/', '_')}": v / n for k, v in sums.items()})
        if self.config.kl_samples and self.kl_prompts:
            prompts = [self.kl_prompts[i % len(self.kl_prompts)] for i in range(self.config.kl_samples)]
            responses, kl = self.sample(prompts, seed=self.config.seed + _KL_SEED)
            metrics["eval/kl"] = sum(kl) / len(kl)
            metrics["eval/response_length"] = sum(
                len(self.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in responses
            ) / len(responses)
        return metrics

    @torch.no_grad()
    def sample(self, prompts: list[str], seed: int | None = None) -> tuple[list[str], list[float]]:
        """(one response per prompt, sampled from the policy at temperature 1; per response the estimate
        sum_t [log pi(y_t) - log ref(y_t)] of KL(policy || reference), unbiased for the sequence KL, or nan once the
        reference is freed). A `seed` samples under that fixed seed and leaves the training RNG where it was, so that
        evaluations differ by the policy, not by the dice."""
        responses, kl = [], []
        rng = torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])
        with rng if seed is not None else contextlib.nullcontext():
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(prompts), 2 * self.config.batch_size):
                chunk = prompts[start : start + 2 * self.config.batch_size]
                prompt_ids, prompt_mask = tokenize_prompts(chunk, self.tokenizer, self.config.max_length)
                prompt_ids, prompt_mask = prompt_ids.to(self.device), prompt_mask.to(self.device)
                with self._autocast():
                    response_ids, response_mask, *_ = generate(
                        self.lm, self.tokenizer, prompt_ids, prompt_mask, self.config.max_new_tokens, 1.0
                    )
                    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
                    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
                    args = (input_ids, attention_mask, response_mask, prompt_ids.shape[1], self.config.fused_logprobs)
                    if self.reference is None and not self.config.lora_rank:  # freed: kl_samples was 0
                        kl += [math.nan] * len(chunk)
                    else:
                        with self._reference_lm() as reference:
                            ref = sequence_logprobs(reference, *args)
                        kl += (sequence_logprobs(self.lm, *args) - ref).tolist()
                responses += decode_responses(self.tokenizer, response_ids, response_mask)
        return responses, kl

    # --- checkpoints ------------------------------------------------------------------------------------------

    def save(self, path: str | None = None) -> str:
        """<output_dir>/checkpoint-<step>: the policy in the Hugging Face layout, the optimizer, the reference cache."""
        state = {
            "step": self.step_count,
            "total_steps": self.total_steps,
            "train_pairs": len(self.train_data),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "reference_logps": self.reference_logps,
            "computed_in": precision.computed_in(self.autocast_dtype),  # what precision auto chose: a resume keeps it
        }
        return save_checkpoint(
            path or self.config.output_dir,
            self.step_count,
            self._saveable(),
            self.tokenizer,
            state,
            self.config.save_merged_lora,
            self.checkpoint_dtype,
        )

    def _resume(self, checkpoint: str, state: dict) -> None:
        if (state["train_pairs"], state["total_steps"]) != (len(self.train_data), self.total_steps):
            raise InputError(
                f"resume_from: {checkpoint} was a run of {state['train_pairs']} pairs and "
                f"{state['total_steps']} steps; this one has {len(self.train_data)} and "
                f"{self.total_steps} (same data, split, epochs and batch size needed)"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.reference_logps = state["reference_logps"]
        for _ in range(state["step"]):  # the batch order is a function of the seed: replay it to the same place
            next(self.batches)
        self.step_count = state["step"]
        print(f"fastppo dpo: resumed from {checkpoint} at step {self.step_count}")


# ----------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------


def run(config: DPOConfig) -> int:
    """`fastppo dpo`: train, report, and say how to continue a run stopped by a signal."""
    trainer = DPOTrainer(config)  # validates the config and reads the pairs before loading the model
    history = trainer.train()
    if trainer.stop_request.requested:
        return stopped("dpo", trainer.stop_request, trainer.step_count)
    last = history[-1] if history else {}
    kl = f", KL {last['eval/kl']:.3f}" if "eval/kl" in last else ""
    accuracy = f", held-out accuracy {last['eval/rewards_accuracy']:.3f}" if "eval/rewards_accuracy" in last else ""
    print(
        f"fastppo dpo: {trainer.step_count} steps, {len(trainer.train_data)} pairs{accuracy}{kl}; "
        f"metrics in {os.path.join(config.output_dir, 'metrics.jsonl')}"
    )
    return 0
