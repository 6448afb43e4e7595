"""Rewards: a learned reward model (a 1-label sequence classifier) or a Python function of the texts.

Either way a reward is called as `reward(batch) -> (B,) float32 scores`, and every score batch is checked: the
right count, all finite. A reward model with the policy's vocabulary scores the generated token ids directly; one
with another tokenizer sees the text the way it was trained on it: the conversation rendered with its own chat
template when it has one, else prompt + response + its EOS (as `fastppo reward-model` encodes pairs) when the
response ended. Sequences too long for it lose the start of the prompt, never the end of the response.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import time

import torch

from fastppo.data import encode
from fastppo.models import disable_dropout, freeze, load_frozen, load_tokenizer, quantized_copy, score_at_last_token
from fastppo.runtime import signals
from fastppo.runtime.errors import InputError
from fastppo.runtime.validation import clip


class RewardError(InputError):
    """The reward returned something unusable (wrong count, NaN, not numbers) or raised."""


class FunctionReward:
    """A rule-based reward: fn(prompts: list[str], responses: list[str]) -> list[float].

    With a `timeout` (seconds) the function runs in a daemon worker thread while the main thread waits, so a
    function that never returns stops the run after `timeout` (a RewardError naming it) and a SIGINT/SIGTERM during
    it is answered at once (`signals.StepInterrupted`). A thread cannot be killed: the stuck call goes on until the
    process exits, which it then does. With no timeout the function is called in the main thread (as a reward that
    uses signals itself needs).
    """

    def __init__(self, fn, name: str | None = None, timeout: float | None = None):
        self.fn, self.name = fn, name or getattr(fn, "__qualname__", repr(fn))
        self.timeout = timeout

    def __call__(self, batch) -> torch.Tensor:
        prompts, responses = list(batch.prompts), list(batch.responses)
        try:
            scores = self.fn(prompts, responses) if self.timeout is None else self._call_in_worker(prompts, responses)
        except (RewardError, signals.StepInterrupted):
            raise
        except SystemExit as exit_:  # it would end the run with its code, 0 included, mid-step and unsaid
            raise RewardError(
                f"reward function {self.name} called sys.exit({exit_.code!r}); a reward returns one score per "
                "response and reports a failure by raising"
            ) from None
        except Exception as error:  # noqa: BLE001 - any failure of user code is reported as the reward's
            raise RewardError(f"reward function {self.name} raised {type(error).__name__}: {clip(error)}") from error
        try:
            scores = torch.as_tensor(scores, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as error:
            raise RewardError(f"reward function {self.name} must return numbers, got {scores!r:.100}") from error
        if scores.dim() != 1:  # a (B/2, 2) list flattened would pair scores with the wrong responses
            raise RewardError(
                f"reward function {self.name} returned scores of shape {tuple(scores.shape)} for "
                f"{len(batch.prompts)} responses: expected a flat list, one number per response"
            )
        return check_scores(scores, len(batch.prompts), self.name)

    def _call_in_worker(self, prompts: list[str], responses: list[str]):
        outcome: dict = {}
        done = threading.Event()

        def work():
            try:
                outcome["scores"] = self.fn(prompts, responses)
            except BaseException as error:  # noqa: BLE001 - handed to the main thread, which reports it
                outcome["error"] = error
            finally:
                done.set()

        threading.Thread(target=work, name=f"fastppo reward {self.name}", daemon=True).start()
        deadline = time.monotonic() + self.timeout
        while not done.wait(min(0.1, max(deadline - time.monotonic(), 0.0))):
            signals.raise_if_stop_requested(f"reward function {self.name} was still running")
            if time.monotonic() >= deadline:
                raise RewardError(
                    f"reward function {self.name} did not return within reward_timeout={self.timeout:g} s; the run "
                    "stops. Raise reward_timeout if it is just slow"
                )
        if "error" in outcome:
            raise outcome["error"]
        return outcome["scores"]


class ModelReward:
    """A sequence classifier with one label, scoring prompt + response."""

    def __init__(self, model, tokenizer, policy_tokenizer, max_length: int = 4096):
        self.model = freeze(model)
        disable_dropout(model)
        self.tokenizer = tokenizer
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        self.same_vocab = tokenizer.get_vocab() == policy_tokenizer.get_vocab()
        self.max_length = max_length
        self.name = type(model).__name__

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
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, r in enumerate(rows):  # right-padded: the score is read at the last real token
            input_ids[i, : len(r)] = torch.tensor(r)
            attention_mask[i, : len(r)] = 1
        scores = self._score(input_ids.to(device), attention_mask.to(device))
        return check_scores(scores.float().cpu(), len(rows), self.name)

    def encode(self, prompt: str, response: str, ended: bool) -> list[int]:
        """Token ids of (prompt, response) in the reward model's own tokenizer, as it saw them in training."""
        tokenizer = self.tokenizer
        if getattr(tokenizer, "chat_template", None):
            messages = list(getattr(prompt, "messages", None) or [{"role": "user", "content": str(prompt)}])
            text = tokenizer.apply_chat_template(
                messages + [{"role": "assistant", "content": response}], tokenize=False
            )
            return encode(tokenizer, text)
        ids = encode(tokenizer, str(prompt)) + tokenizer(response, add_special_tokens=False)["input_ids"]
        return ids + [tokenizer.eos_token_id] if ended and tokenizer.eos_token_id is not None else ids

    def _score(self, input_ids, attention_mask) -> torch.Tensor:
        return score_at_last_token(self.model, input_ids, attention_mask)


def check_scores(scores: torch.Tensor, expected: int, name: str) -> torch.Tensor:
    if scores.numel() != expected:
        raise RewardError(f"reward {name} returned {scores.numel()} scores for {expected} responses")
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        raise RewardError(f"reward {name} returned non-finite scores at positions {bad[:5]}")
    return scores


def load_function(spec: str):
    """The function of a 'module:function' spec. The working directory is searched too (last), as `python -m` does,
    so a reward module beside the config is found by the `fastppo` script as well."""
    module_name, _, function_name = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise InputError(f"reward_model: cannot import module {module_name!r} ({error})") from None
    except SyntaxError as error:
        raise InputError(
            f"reward_model: module {module_name!r} has a syntax error at {error.filename}:{error.lineno}: {error.msg}"
        ) from None
    except (Exception, SystemExit) as error:  # noqa: BLE001 - the user's module failed (or exited) while importing
        raise InputError(
            f"reward_model: importing module {module_name!r} raised {type(error).__name__}: {clip(error)}"
        ) from None
    fn = getattr(module, function_name, None)
    if not callable(fn):
        raise InputError(f"reward_model: {module_name} has no function {function_name!r}")
    return fn


def load_reward(spec, config, policy_tokenizer, device):
    """A reward from a path, a 'module:function' string, a callable, or a loaded sequence-classification model."""
    from fastppo.runtime.validation import is_callable_spec

    if spec is None:
        raise InputError("reward_model: no reward given (a model path, 'module:function' or a callable)")
    if isinstance(spec, str) and is_callable_spec(spec):
        return FunctionReward(load_function(spec), name=spec, timeout=config.reward_timeout)
    if isinstance(spec, str):
        from transformers import AutoModelForSequenceClassification

        model = load_frozen(AutoModelForSequenceClassification, spec, config.reward_quantization, device)
        if model.config.num_labels != 1:
            raise InputError(f"reward_model {spec}: expected a classifier with 1 label, got {model.config.num_labels}")
        tokenizer = load_tokenizer(config.reward_tokenizer or spec)
        return ModelReward(model, tokenizer, policy_tokenizer)
    if isinstance(spec, torch.nn.Module):
        from transformers import AutoModelForSequenceClassification

        tokenizer = load_tokenizer(config.reward_tokenizer) if config.reward_tokenizer else policy_tokenizer
        if config.reward_quantization == "none":
            model = spec.to(device)
        else:
            dtype = next(spec.parameters()).dtype
            model = quantized_copy(spec, AutoModelForSequenceClassification, config.reward_quantization, device, dtype)
        return ModelReward(model, tokenizer, policy_tokenizer)
    if callable(spec):
        return FunctionReward(spec, timeout=config.reward_timeout)
    raise InputError(f"reward: cannot use a {type(spec).__name__} as a reward")
