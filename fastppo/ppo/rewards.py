"""Rewards: learned reward models (1-label sequence classifiers) and Python functions, one or several, weighted.

Every reward scores every response of a batch; `Rewards` holds them all (TRL's `reward_funcs`, models and functions
mixed), and the score PPO optimizes is their weighted sum (`reward_weights`), a reward that returned None for a
response counting 0 there (TRL's nansum). Each reward's scores are checked: the right count, finite numbers.

A reward model with the policy's vocabulary scores the generated token ids directly; one with another tokenizer sees
the text the way it was trained on it: the conversation rendered with its own chat template when it has one, else
prompt + response + its EOS (as `fastppo reward-model` encodes pairs) when the response ended. Sequences too long for
it lose the start of the prompt, never the end of the response. A model object comes with its tokenizer
(`reward_tokenizer`), or its `name_or_path` holds one; without either it must have the policy's vocabulary size, or
it is refused. Reward functions, and their two calling conventions: reward_functions.py.
"""

from __future__ import annotations

import os
import types
import warnings

import torch

from fastppo.data import encode, text_messages
from fastppo.models import disable_dropout, freeze, load_frozen, load_tokenizer, quantized_copy, score_at_last_token
from fastppo.packing import use_packing
from fastppo.ppo.reward_functions import (
    FunctionReward,
    RewardError,
    call_reward,
    check_scores,
    load_function,
    reward_form,
    run_coroutines,
)
from fastppo.runtime.errors import InputError
from fastppo.runtime.micro_batches import forward_overhead, sorted_micro_batches
from fastppo.runtime.validation import LOAD_ERRORS, context_length, is_callable_spec, read_model_config

__all__ = ["FunctionReward", "ModelReward", "RewardError", "Rewards", "load_reward", "load_rewards"]


class Rewards:
    """Every reward of a run. Called on a batch: (B, K) float32, each reward's scores (NaN where one does not
    apply); `combine` gives the score PPO optimizes and `stats` TRL's per-reward metrics."""

    def __init__(self, rewards: list, weights: list[float] | None = None):
        self.rewards = rewards
        self.weights = torch.tensor(weights if weights is not None else [1.0] * len(rewards), dtype=torch.float32)
        self.names = _unique([reward.metric_name for reward in rewards])
        self.trainer_state = types.SimpleNamespace(global_step=0, max_steps=None)  # TRL's `trainer_state` argument
        for reward in rewards:
            if isinstance(reward, FunctionReward):
                reward.trainer_state = self.trainer_state

    def __call__(self, batch) -> torch.Tensor:
        waiting = [reward for reward in self.rewards if getattr(reward, "is_async", False)]
        scores = {}
        if waiting:  # the async functions, concurrently
            names = " and ".join(reward.name for reward in waiting)
            calls = lambda: run_coroutines([r.start(batch) for r in waiting])
            results = call_reward(calls, names, waiting[0].timeout, waiting)
            scores = {id(r): r.scores(result, len(batch.prompts)) for r, result in zip(waiting, results, strict=True)}
        columns = [scores[id(r)] if id(r) in scores else r(batch).float().cpu() for r in self.rewards]
        return torch.stack(columns, dim=1)

    def combine(self, scores: torch.Tensor) -> torch.Tensor:
        """(B,) the weighted sum of each row's rewards; one that does not apply (NaN) counts 0."""
        unscored = int(scores.isnan().all(dim=1).sum())
        if unscored:
            warnings.warn(
                f"no reward applies to {unscored} response(s) (every reward function returned None): their score "
                "is 0; make sure one reward scores every response",
                stacklevel=2,
            )
        return (scores * self.weights.to(scores.device)).nansum(dim=1)

    def stats(self, scores: torch.Tensor) -> dict[str, float]:
        """TRL's names: rewards/<name>/mean and /std over the responses each reward applies to."""
        stats = {}
        for name, column in zip(self.names, scores.float().unbind(dim=1), strict=True):
            applied = column[~column.isnan()]
            if applied.numel():
                stats[f"rewards/{name}/mean"] = float(applied.mean())
                stats[f"rewards/{name}/std"] = float(applied.std()) if applied.numel() > 1 else 0.0
        fractions = [r.real_frac for r in self.rewards if getattr(r, "real_frac", None) is not None]
        if fractions:  # the reward models' forwards: real tokens over computed ones
            stats["perf/reward_real_frac"] = sum(fractions) / len(fractions)
        return stats


def _unique(names: list[str]) -> list[str]:
    """The names, a repeated one numbered (two lambdas: <lambda>_1, <lambda>_2)."""
    return [f"{n}_{names[:i].count(n) + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)]


class ModelReward:
    """A sequence classifier with one label, scoring prompt + response."""

    def __init__(
        self,
        model,
        tokenizer,
        policy_tokenizer,
        max_length: int = 4096,
        name: str | None = None,
        rows_per_forward: int | None = None,
        tokens_per_forward: int | None = None,
        packed: bool = False,
    ):
        self.model = freeze(model)
        self.packed = packed  # forwards over the real tokens packed into one row (fastppo.packing)
        self.rows_per_forward = rows_per_forward  # None: the whole batch in one forward
        self.tokens_per_forward = tokens_per_forward  # None: rows_per_forward rows whatever their length
        self.overhead = forward_overhead(model)  # see runtime.micro_batches
        self.real_frac = None  # of the last batch: real tokens over the tokens its forwards computed
        disable_dropout(model)
        self.tokenizer = tokenizer
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        self.same_vocab = tokenizer.get_vocab() == policy_tokenizer.get_vocab()
        self.max_length = max_length
        self.name = self.metric_name = name or type(model).__name__

    @torch.no_grad()
    def __call__(self, batch) -> torch.Tensor:
        device = next(self.model.parameters()).device
        if self.same_vocab:
            rows = [
                torch.cat([p[pm.bool()], r[rm.bool()]]).tolist()
                for p, pm, r, rm in zip(
                    batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask, strict=True
                )
            ]
        else:
            rows = [
                self.encode(p, r, bool(e)) for p, r, e in zip(batch.prompts, batch.responses, batch.ended, strict=True)
            ]
        rows = [r[-self.max_length :] for r in rows]  # too long: drop the start of the prompt
        # Rows of similar length together, at most `rows_per_forward` (and `tokens_per_forward`) at a time, each as
        # wide as its longest: the forwards pay for real tokens, not for the batch's longest row.
        scores = torch.empty(len(rows))
        real = computed = 0
        lengths = [len(r) for r in rows]
        for chunk in sorted_micro_batches(lengths, self.rows_per_forward, self.tokens_per_forward, self.overhead):
            width = max(len(rows[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), self.tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for j, i in enumerate(chunk):  # right-padded: the score is read at the last real token
                input_ids[j, : len(rows[i])] = torch.tensor(rows[i])
                attention_mask[j, : len(rows[i])] = 1
            chunk_scores = self._score(input_ids.to(device), attention_mask.to(device)).float().cpu()
            scores[chunk] = check_scores(chunk_scores, len(chunk), self.name)
            real, computed = real + int(attention_mask.sum()), computed + input_ids.numel()
        self.real_frac = real / max(computed, 1)
        return scores

    def encode(self, prompt: str, response: str, ended: bool) -> list[int]:
        """Token ids of (prompt, response) in the reward model's own tokenizer, as it saw them in training."""
        tokenizer = self.tokenizer
        if getattr(tokenizer, "chat_template", None):
            messages = text_messages(getattr(prompt, "messages", None) or [{"role": "user", "content": str(prompt)}])
            text = tokenizer.apply_chat_template(
                messages + [{"role": "assistant", "content": response}], tokenize=False
            )
            return encode(tokenizer, text)
        ids = encode(tokenizer, str(prompt)) + tokenizer(response, add_special_tokens=False)["input_ids"]
        return ids + [tokenizer.eos_token_id] if ended and tokenizer.eos_token_id is not None else ids

    def _score(self, input_ids, attention_mask) -> torch.Tensor:
        return score_at_last_token(self.model, input_ids, attention_mask, self.packed)


def reward_specs(config, given=None) -> list[tuple[str, object]]:
    """(config field, reward) of every reward of the run: `given` (PPOTrainer's `reward`), else reward_funcs, else
    reward_model; one or a list."""
    if given is not None:
        field, specs = "reward", given
    elif config.reward_funcs is not None:
        field, specs = "reward_funcs", config.reward_funcs
    else:
        field, specs = "reward_model", config.reward_model
    if specs is None:
        raise InputError(
            "reward_model: no reward given (a model path or 'module:function'; or reward_funcs: a list of them)"
        )
    if not isinstance(specs, (list, tuple)):
        return [(field, specs)]
    return [(f"{field}[{i}]", spec) for i, spec in enumerate(specs)]


def is_model_spec(spec) -> bool:
    return isinstance(spec, torch.nn.Module) or (isinstance(spec, str) and not is_callable_spec(spec))


def load_rewards(
    config, policy_tokenizer, device, given=None, reward_tokenizer=None, columns=(), policy=None
) -> Rewards:
    """Every reward of the run (`reward_specs`), weighted by reward_weights. `reward_tokenizer` (an object, else the
    config's path) is the tokenizer of the one reward model; `columns` are the prompts' (for the functions' forms);
    `policy` (a path or the model) tells a model object without a tokenizer whether it shares the policy's
    vocabulary."""
    specs = reward_specs(config, given)
    weights = config.reward_weights
    if weights is not None and len(weights) != len(specs):
        raise InputError(f"reward_weights has {len(weights)} weights for {len(specs)} rewards: give one per reward")
    tokenizer = reward_tokenizer if reward_tokenizer is not None else config.reward_tokenizer
    models = [field for field, spec in specs if is_model_spec(spec)]
    if tokenizer is not None and len(models) != 1:
        raise InputError(
            f"reward_tokenizer is the tokenizer of the one reward model, and there are {len(models)} "
            f"({', '.join(models) or 'none'}): each model in reward_funcs uses its own directory's tokenizer"
        )
    rewards = [
        load_reward(spec, config, policy_tokenizer, device, tokenizer, columns, policy, field) for field, spec in specs
    ]
    return Rewards(rewards, weights)


def check_columns(rewards: list, prompts: list, field: str) -> None:
    """Reward functions of TRL's form get the prompts' columns by name: every column one needs must be in `prompts`
    (eval_prompts) too, as `reward_form` checked the training prompts' at load; else the first evaluation, steps
    into the run, would stop it with the function's TypeError."""
    if not prompts:
        return
    columns = dict.fromkeys(name for prompt in prompts for name in prompt.columns)
    for reward in rewards:
        if isinstance(reward, FunctionReward) and reward.form == "trl":
            reward_form(reward.fn, f"{reward.name} (on {field})", columns)


def load_reward(
    spec, config, policy_tokenizer, device, tokenizer=None, columns=(), policy=None, field: str = "reward_model"
):
    """One reward from a path, a 'module:function' string, a callable, or a loaded sequence-classification model."""
    from transformers import AutoModelForSequenceClassification

    directories = [config.config_dir] if getattr(config, "config_dir", None) else []
    if isinstance(spec, str) and is_callable_spec(spec):
        fn = load_function(spec, field.partition("[")[0], directories)
        return FunctionReward(fn, name=spec, timeout=config.reward_timeout, columns=columns)
    if isinstance(spec, str):
        model = load_frozen(AutoModelForSequenceClassification, spec, config.reward_quantization, device)
        tokenizer = load_tokenizer(tokenizer if tokenizer is not None else spec)
        name = os.path.basename(os.path.normpath(spec))
        return _model_reward(model, tokenizer, policy_tokenizer, field, name, config)
    if isinstance(spec, torch.nn.Module):
        name = getattr(spec, "name_or_path", "") or ""
        if tokenizer is not None:
            tokenizer = load_tokenizer(tokenizer)
        else:
            tokenizer = _tokenizer_of(spec) or _policy_tokenizer_if_same_vocabulary(spec, policy, policy_tokenizer)
        if config.reward_quantization == "none":
            model = spec.to(device)
        else:
            dtype = next(spec.parameters()).dtype
            model = quantized_copy(spec, AutoModelForSequenceClassification, config.reward_quantization, device, dtype)
        name = os.path.basename(os.path.normpath(name)) if name else type(spec).__name__
        return _model_reward(model, tokenizer, policy_tokenizer, field, name, config)
    if callable(spec):
        return FunctionReward(spec, timeout=config.reward_timeout, columns=columns)
    raise InputError(f"{field}: cannot use a {type(spec).__name__} as a reward")


def _model_reward(model, tokenizer, policy_tokenizer, field: str, name: str, config) -> ModelReward:
    """A ModelReward, its forwards cut as the config's micro-batches are, after checking `model` is a 1-label
    classifier whose embeddings hold every id of `tokenizer` (another model's tokenizer would index past them, or
    score other tokens than the text's)."""
    labels = getattr(model.config, "num_labels", None)
    if labels != 1:
        raise InputError(f"{field} ({name}): expected a sequence classifier with 1 label, got {labels}")
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise InputError(
            f"{field} ({name}): its tokenizer has {len(tokenizer)} tokens and the model {rows} embeddings: it is "
            "not this model's tokenizer; give the model's own (PPOTrainer(reward_tokenizer=...) or reward_tokenizer)"
        )
    rows, tokens = getattr(config, "micro_batch", None), getattr(config, "micro_batch_tokens", None)
    padding_free = getattr(config, "padding_free", False)  # configs without the field: never packed
    backbone = getattr(model, model.base_model_prefix, None)
    packed = hasattr(model, "score") and use_packing(padding_free, model, backbone, field)
    context = context_length(model.config.to_dict())  # its position table: longer rows lose the prompt's start
    return ModelReward(
        model,
        tokenizer,
        policy_tokenizer,
        max_length=min(4096, context) if context else 4096,
        name=name,
        rows_per_forward=rows,
        tokens_per_forward=tokens,
        packed=packed,
    )


def _tokenizer_of(model):
    """The tokenizer saved with a model object: in its `name_or_path` directory, or Hugging Face's cache (no
    download); None when there is none."""
    name = getattr(model, "name_or_path", "") or ""
    if not name:
        return None
    try:
        if os.path.isdir(name):
            return load_tokenizer(name)
        from transformers import AutoTokenizer

        return load_tokenizer(AutoTokenizer.from_pretrained(name, local_files_only=True))
    except (InputError, *LOAD_ERRORS):
        return None


def _policy_tokenizer_if_same_vocabulary(model, policy, policy_tokenizer):
    """A reward model object with no tokenizer to be found scores with the policy's only when its embeddings have
    the policy's row count (a model of the same family); otherwise its scores would be of other tokens."""
    rows = model.get_input_embeddings().num_embeddings
    if isinstance(policy, str):
        config = read_model_config("policy_model", policy)
        policy_rows = (config.get("text_config") or config).get("vocab_size") or config.get("vocab_size")
    elif policy is not None:
        policy_rows = policy.get_input_embeddings().num_embeddings
    else:
        policy_rows = None
    if rows != policy_rows:
        where = getattr(model, "name_or_path", "") or ""
        raise InputError(
            f"reward: the {type(model).__name__} object has no tokenizer to be found "
            f"({f'none in {where}' if where else 'no name_or_path'}) and its vocabulary ({rows} embeddings) is not "
            f"the policy's ({policy_rows}): pass its tokenizer, PPOTrainer(..., reward_tokenizer=tokenizer), or "
            "set reward_tokenizer to its path"
        )
    return policy_tokenizer
