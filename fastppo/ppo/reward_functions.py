"""Reward functions: which of two conventions a function follows, told from its signature, and calling it safely.

fastppo's own:          def f(prompts, responses) -> list[float]
    two positional arguments: the prompts as the policy read them (chat messages rendered with its template) and
    the response strings.
TRL's (GRPOTrainer's):  def f(completions, **kwargs) -> list[float | None]
    called by keyword with `prompts` (each a string, or its chat messages), `completions` (each a string, or
    [{"role": "assistant", "content": ...}] when its prompt is a conversation), `completion_ids` (lists of token
    ids), `trainer_state` (.global_step, .max_steps) and every other column of the prompts' rows (`answer`, ...).
    A function without **kwargs gets the ones it names.

Which one a function follows is decided once, at start-up, from its signature (`reward_form`): one that fits
neither, or whose parameters could be read both ways, is refused (exit 2) naming it and the two forms. None from a
function for a response means it does not apply there (TRL's semantics; `rewards.Rewards` sums what applies).

`async def` functions run concurrently, on one event loop (`run_coroutines`). With `reward_timeout`, functions run
in a worker thread while the main thread waits: one that never returns stops the run after the timeout (a
RewardError naming it), and a SIGINT/SIGTERM during it is answered at once (`signals.StepInterrupted`). A thread
cannot be killed: the stuck call goes on until the process exits, which it then does. Signal handlers can only be
set in the main thread, and verifiers that time themselves with SIGALRM (math-verify's `parse` and `verify`) fail
in a worker, often inside an `except Exception` that turns every score into 0. So in a worker, setting a handler or
a timer raises `NeedsTheMainThread`, which no such guard catches; the call is made again in the main thread, where
that function runs from then on (with a warning: reward_timeout cannot stop it there). reward_timeout: null calls
every function in the main thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import functools
import importlib
import inspect
import math
import os
import signal
import sys
import threading
import time
import warnings

import torch

from fastppo.data import ChatPrompt
from fastppo.runtime import signals
from fastppo.runtime.errors import InputError
from fastppo.runtime.validation import clip

TRL_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state")
FORMS = (
    "fastppo's f(prompts, responses), two positional parameters; or TRL's f(completions, **kwargs), called by "
    "keyword with prompts, completions, completion_ids, trainer_state and the prompts' columns"
)


class RewardError(InputError):
    """The reward returned something unusable (wrong count, NaN, not numbers) or raised."""


def check_scores(scores: torch.Tensor, expected: int, name: str) -> torch.Tensor:
    if scores.numel() != expected:
        raise RewardError(f"reward {name} returned {scores.numel()} scores for {expected} responses")
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        raise RewardError(f"reward {name} returned non-finite scores at positions {bad[:5]}")
    return scores


def reward_form(fn, name: str, columns=()) -> tuple[str, frozenset | None]:
    """("fastppo", None), or ("trl", the keywords it takes: None for all) from `fn`'s signature; `columns` are those
    of the prompts' rows, which TRL's form passes by name."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        raise InputError(f"reward function {name}: its signature cannot be read; wrap it in a def: {FORMS}") from None

    def refuse(problem: str):
        raise InputError(f"reward function {name}: {problem}. The two forms: {FORMS}")

    P = inspect.Parameter
    named = [p for p in parameters if p.kind not in (P.VAR_POSITIONAL, P.VAR_KEYWORD)]
    positional = [p for p in named if p.kind != P.KEYWORD_ONLY]
    required = [p for p in named if p.default is P.empty]
    takes_two = (
        (len(positional) >= 2 or any(p.kind == P.VAR_POSITIONAL for p in parameters))
        and sum(p.kind != P.KEYWORD_ONLY for p in required) <= 2
        and all(p.kind != P.KEYWORD_ONLY for p in required)
    )
    if takes_two and len(positional) >= 2 and positional[1].name == "responses":  # fastppo's own word
        return "fastppo", None
    takes_keywords = any(p.kind == P.VAR_KEYWORD for p in parameters)
    available = set(TRL_ARGUMENTS) | set(columns)
    if takes_keywords or any(p.kind == P.KEYWORD_ONLY or p.name in ("completions", "completion_ids") for p in named):
        only_positional = [p.name for p in named if p.kind == P.POSITIONAL_ONLY]
        if only_positional:
            refuse(f"TRL's form passes everything by keyword, and {only_positional[0]!r} is positional-only")
        missing = [p.name for p in required if p.name not in available]
        if missing:
            have = f"their columns are {sorted(columns)}" if columns else "they have no other columns"
            refuse(
                f"it needs {missing[0]!r}, which is neither one of TRL's arguments nor a column of the prompts ({have})"
            )
        clash = sorted(set(columns) & set(TRL_ARGUMENTS))
        if clash:
            refuse(f"the prompts have a column {clash[0]!r}, which TRL's form passes itself: rename the column")
        return "trl", None if takes_keywords else frozenset(p.name for p in named)
    if takes_two:
        clash = [p.name for p in positional[:2] if p.name in available and p.name != "prompts"]
        if clash:
            refuse(
                f"its parameter {clash[0]!r} is something TRL's form passes by name, but it has no **kwargs: add "
                "**kwargs for TRL's form, or name its second parameter `responses` for fastppo's"
            )
        return "fastppo", None
    refuse("its parameters fit neither form")


def trl_arguments(batch, trainer_state) -> dict:
    """The keyword arguments of TRL's form for `batch`: fresh lists (a function may change what it is given)."""
    prompts = list(batch.prompts)
    chat = [isinstance(p, ChatPrompt) for p in prompts]
    rows = [getattr(p, "columns", {}) for p in prompts]
    names = dict.fromkeys(name for row in rows for name in row)  # every row's columns, in order
    ids, masks = batch.response_ids.cpu(), batch.response_mask.cpu().bool()
    return {
        "prompts": [copy.deepcopy(p.messages) if c else str(p) for p, c in zip(prompts, chat, strict=True)],
        "completions": [
            [{"role": "assistant", "content": r}] if c else r for r, c in zip(batch.responses, chat, strict=True)
        ],
        "completion_ids": [row[mask].tolist() for row, mask in zip(ids, masks, strict=True)],
        "trainer_state": trainer_state,
        **{name: [copy.deepcopy(row.get(name)) for row in rows] for name in names},
    }


class FunctionReward:
    """A reward function of either form (see the module's docstring), called on a batch: (B,) float32 scores, NaN
    where it returned None."""

    def __init__(self, fn, name: str | None = None, timeout: float | None = None, columns=(), trainer_state=None):
        self.fn, self.name = fn, name or getattr(fn, "__qualname__", None) or repr(fn)
        self.metric_name = getattr(fn, "__name__", None) or type(fn).__name__  # TRL's: rewards/<__name__>/mean
        self.timeout, self.trainer_state = timeout, trainer_state
        self.form, self.keywords = reward_form(fn, self.name, columns)
        self.is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)
        self.in_main_thread = False  # set once it has set a signal handler (see `call_reward`)

    def start(self, batch):
        """Call the function on `batch`: its result (a coroutine for an async function)."""
        if self.form == "fastppo":
            return self.fn(list(batch.prompts), list(batch.responses))
        arguments = trl_arguments(batch, self.trainer_state)
        if self.keywords is not None:
            arguments = {key: value for key, value in arguments.items() if key in self.keywords}
        return self.fn(**arguments)

    def __call__(self, batch) -> torch.Tensor:
        if self.is_async:
            result = call_reward(lambda: run_coroutines([self.start(batch)])[0], self.name, self.timeout, [self])
        else:
            result = call_reward(lambda: self.start(batch), self.name, self.timeout, [self])
        return self.scores(result, len(batch.prompts))

    def scores(self, result, expected: int) -> torch.Tensor:
        """The function's `result` as (expected,) float32 scores, NaN where it returned None; anything else that is
        not a finite number, or a wrong count, is a RewardError."""
        missing = [value is None for value in result] if isinstance(result, (list, tuple)) else []
        try:
            values = [math.nan if value is None else value for value in result] if missing else result
            scores = torch.as_tensor(values, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as error:
            raise RewardError(f"reward function {self.name} must return numbers, got {result!r:.100}") from error
        if scores.dim() != 1:  # a (B/2, 2) list flattened would pair scores with the wrong responses
            raise RewardError(
                f"reward function {self.name} returned scores of shape {tuple(scores.shape)} for {expected} "
                "responses: expected a flat list, one number per response"
            )
        not_applied = torch.tensor(missing if len(missing) == scores.numel() else [False] * scores.numel())
        check_scores(scores.masked_fill(not_applied, 0.0), expected, self.name)  # NaN only where None was
        return scores


def call_reward(thunk, name: str, timeout: float | None, rewards: list):
    """`thunk()`, a call of the reward functions `rewards` (one, or the async ones together): in a worker thread with
    a `timeout` (see the module's docstring), in the main thread without one or once they have set a signal handler;
    any failure is a RewardError naming the reward `name`."""
    if timeout is not None and not any(reward.in_main_thread for reward in rewards):
        try:
            return _call_guarded(thunk, name, timeout)
        except NeedsTheMainThread:
            for reward in rewards:
                reward.in_main_thread = True
            warnings.warn(
                f"reward function {name} sets a signal handler (as math-verify's timeouts do), which works only in "
                "the main thread: it is called there from now on (this batch again), where reward_timeout cannot "
                "stop it",
                stacklevel=3,
            )
    return _call_guarded(thunk, name, None)


def _call_guarded(thunk, name: str, timeout: float | None):
    try:
        return thunk() if timeout is None else _call_in_worker(thunk, name, timeout)
    except (RewardError, signals.StepInterrupted):
        raise
    except SystemExit as exit_:  # it would end the run with its code, 0 included, mid-step and unsaid
        raise RewardError(
            f"reward function {name} called sys.exit({exit_.code!r}); a reward returns one score per response and "
            "reports a failure by raising"
        ) from None
    except Exception as error:  # noqa: BLE001 - any failure of user code is reported as the reward's
        if timeout is not None and _signal_error(error):  # a signal function the guard does not cover
            raise NeedsTheMainThread from error
        raise RewardError(f"reward function {name} raised {type(error).__name__}: {clip(error)}") from error


class NeedsTheMainThread(BaseException):
    """Raised in a reward worker thread when the function sets a signal handler or timer. A BaseException: code that
    catches `Exception` around its verifier (a common guard around math-verify) would otherwise turn the
    ValueError Python raises there into a score of 0 on every response, silently."""


_worker = threading.local()  # .running: this thread runs a reward function for `_call_in_worker`


def _guard_signals() -> None:
    """Once per process: signal.signal, alarm and setitimer raise NeedsTheMainThread in a reward worker thread, and
    behave as always everywhere else."""
    for name in ("signal", "alarm", "setitimer"):
        original = getattr(signal, name)
        if getattr(original, "fastppo_guard", False):
            continue

        def guarded(*args, _original=original, **kwargs):
            if getattr(_worker, "running", False):
                raise NeedsTheMainThread
            return _original(*args, **kwargs)

        guarded.fastppo_guard = True
        setattr(signal, name, functools.wraps(original)(guarded))


def _signal_error(error: BaseException | None) -> bool:
    while error is not None:  # libraries re-raise it with their own message (math-verify does), the cause kept
        if isinstance(error, ValueError) and "signal only works in main thread" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _call_in_worker(thunk, name: str, timeout: float):
    _guard_signals()
    outcome: dict = {}
    done = threading.Event()

    def work():
        _worker.running = True
        try:
            outcome["result"] = thunk()
        except BaseException as error:  # noqa: BLE001 - handed to the main thread, which reports it
            outcome["error"] = error
        finally:
            done.set()

    threading.Thread(target=work, name=f"fastppo reward {name}", daemon=True).start()
    deadline = time.monotonic() + timeout
    while not done.wait(min(0.1, max(deadline - time.monotonic(), 0.0))):
        signals.raise_if_stop_requested(f"reward function {name} was still running")
        if time.monotonic() >= deadline:
            raise RewardError(
                f"reward function {name} did not return within reward_timeout={timeout:g} s; the run stops (the "
                "last checkpoint is intact). Raise reward_timeout if it is just slow"
            )
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def run_coroutines(coroutines: list) -> list:
    """The results of `coroutines`, run concurrently on one event loop."""

    async def gather():
        return await asyncio.gather(*coroutines)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(gather())
    # This thread already runs an event loop (a notebook's): a fresh one, in a thread of its own.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, gather()).result()


def load_function(spec: str, field: str = "reward_model", directories=()):
    """The function of a 'module:function' spec. `directories` (the config file's) and the working directory are
    searched too, last, as `python -m` does, so a reward module beside the config is found by the `fastppo` script
    as well."""
    module_name, _, function_name = spec.partition(":")
    for directory in [*directories, os.getcwd()]:
        if directory not in sys.path:
            sys.path.append(directory)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise InputError(f"{field}: cannot import module {module_name!r} ({error})") from None
    except SyntaxError as error:
        raise InputError(
            f"{field}: module {module_name!r} has a syntax error at {error.filename}:{error.lineno}: {error.msg}"
        ) from None
    except (Exception, SystemExit) as error:  # noqa: BLE001 - the user's module failed (or exited) while importing
        raise InputError(
            f"{field}: importing module {module_name!r} raised {type(error).__name__}: {clip(error)}"
        ) from None
    fn = getattr(module, function_name, None)
    if not callable(fn):
        raise InputError(f"{field}: {module_name} has no function {function_name!r}")
    return fn
