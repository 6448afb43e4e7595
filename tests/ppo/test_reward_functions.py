"""Reward functions in either convention, told apart by their signatures at start-up: fastppo's f(prompts, responses)
and TRL's f(completions, **kwargs) called by keyword with the rows' columns; async functions run concurrently, and a
function that sets a signal handler (math-verify's timeouts) is told how to run."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
import torch

from fastppo.data import read_prompts
from fastppo.ppo.config import PPOConfig
from fastppo.ppo.reward_functions import FunctionReward, reward_form
from fastppo.ppo.rewards import Rewards, load_reward
from fastppo.runtime.errors import InputError
from tests.ppo.test_rewards import fake_batch
from tests.tiny_models import build_tokenizer

# --- telling the forms apart ----------------------------------------------------------------------------------


def fastppo_named(prompts, responses):
    return [0.0] * len(responses)


def trl_accuracy(completions, answer, **kwargs):
    return [0.0] * len(completions)


def trl_keyword_only(*, completions, completion_ids, trainer_state, **kwargs):
    return [0.0] * len(completions)


def trl_without_kwargs(prompts, completions, answer=None):
    return [0.0] * len(completions)


def fastppo_with_kwargs(prompts, responses, **kwargs):
    return [0.0] * len(responses)


@pytest.mark.parametrize(
    "fn, columns, form",
    [
        (fastppo_named, (), ("fastppo", None)),
        (lambda p, r: [0.0] * len(r), (), ("fastppo", None)),
        (fastppo_with_kwargs, ("answer",), ("fastppo", None)),
        (trl_accuracy, ("answer",), ("trl", None)),
        (trl_keyword_only, (), ("trl", None)),
        (trl_without_kwargs, (), ("trl", frozenset({"prompts", "completions", "answer"}))),
        (lambda completions, **kw: [0.0] * len(completions), (), ("trl", None)),
    ],
)
def test_the_form_is_read_from_the_signature(fn, columns, form):
    assert reward_form(fn, "f", columns) == form


def needs_answer(prompts, answer):
    return [0.0] * len(answer)


@pytest.mark.parametrize(
    "fn, columns, named",
    [
        (trl_accuracy, (), "needs 'answer', which is neither one of TRL's arguments nor a column"),
        (needs_answer, ("answer",), "'answer' is something TRL's form passes by name, but it has no **kwargs"),
        (lambda completions, /, **kwargs: [], (), "'completions' is positional-only"),
        (lambda one: [], (), "its parameters fit neither form"),
        (lambda completions, **kwargs: [], ("completions",), "a column 'completions', which TRL's form passes"),
        (len, (), "fit neither form"),
    ],
)
def test_a_function_that_fits_neither_form_is_refused_naming_both(fn, columns, named):
    with pytest.raises(
        InputError, match="reward function f: .*The two forms: fastppo's f\\(prompts, responses\\)"
    ) as e:
        reward_form(fn, "f", columns)
    assert named in str(e.value)


# --- what each form receives ----------------------------------------------------------------------------------


def test_trl_form_gets_completions_ids_state_and_every_column_by_keyword():
    """The rows' columns line up with the responses they score; conversational prompts give message completions,
    as TRL's GRPOTrainer does, and plain prompts strings."""
    tokenizer = build_tokenizer()
    prompts = read_prompts(
        [
            {"prompt": [{"role": "user", "content": "w1 w2"}], "answer": "w7", "level": 1},
            {"prompt": "w3", "answer": "w9"},
        ],
        tokenizer,
    )
    batch = fake_batch(prompts, ["w7 w8", "w4"])
    seen = {}

    def accuracy(completions, answer, **kwargs):
        seen.update(kwargs, completions=completions, answer=answer)
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [float(text.startswith(a)) for text, a in zip(texts, answer, strict=True)]

    def only_named(*, completion_ids, level):
        seen.update(only_named=(completion_ids, level))
        return [None, 2.0]

    rewards = Rewards(
        [FunctionReward(accuracy, columns=("answer", "level")), FunctionReward(only_named, columns=("level",))]
    )
    rewards.trainer_state.global_step = 3
    scores = rewards(batch)
    assert seen["completions"] == [[{"role": "assistant", "content": "w7 w8"}], "w4"]
    assert seen["prompts"] == [[{"role": "user", "content": "w1 w2"}], "w3"]
    assert seen["answer"] == ["w7", "w9"] and seen["level"] == [1, None]  # a row without the column: None
    assert seen["completion_ids"] == tokenizer(["w7 w8", "w4"], add_special_tokens=False)["input_ids"]
    assert seen["trainer_state"].global_step == 3
    assert seen["only_named"] == (seen["completion_ids"], [1, None])  # no **kwargs: just what it names
    assert scores[:, 0].tolist() == [1.0, 0.0] and scores[0, 1].isnan() and scores[1, 1] == 2.0
    seen["prompts"][0].append("changed by the function")
    assert prompts[0].messages == [{"role": "user", "content": "w1 w2"}]  # what it was given was a copy


def test_fastppo_form_gets_the_rendered_prompts_and_the_responses():
    prompts = read_prompts([[{"role": "user", "content": "w1"}]], build_tokenizer())
    seen = []
    FunctionReward(lambda p, r: seen.append((p, r)) or [1.0])(fake_batch(prompts, ["w2"]))
    assert seen == [(["<bos>user: w1 <|im_end|> assistant:"], ["w2"])]


# --- async functions, threads and signals ----------------------------------------------------------------------


def test_async_functions_run_concurrently():
    """Each waits until both have started: run one after the other, the first would never return."""
    started = []

    async def waits_for_the_other(completions, **kwargs):
        started.append(1)
        deadline = time.monotonic() + 10
        while len(started) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return [float(len(started))] * len(completions)

    async def also_waits(prompts, responses):
        return await waits_for_the_other(responses)

    for timeout in (None, 30.0):  # in the main thread, and in the worker thread
        started.clear()
        rewards = Rewards([FunctionReward(waits_for_the_other, timeout=timeout), FunctionReward(also_waits)])
        assert rewards(fake_batch(["w1"], ["w2"])).tolist() == [[2.0, 2.0]]
    started.clear()
    started.append(0)  # alone, it does not wait
    assert FunctionReward(waits_for_the_other)(fake_batch(["w1"], ["w2"])).tolist() == [2.0]


def verify_with_an_alarm(completions, **kwargs):
    """A verifier with a signal-based timeout, as math-verify's `parse` and `verify` have, behind the usual guard
    that scores a failure 0: in a worker thread, where Python refuses signal handlers, every score would be 0."""
    scores = []
    for _ in completions:
        try:
            previous = signal.signal(signal.SIGALRM, lambda *args: None)
            signal.alarm(5)
            try:
                scores.append(1.0)
            finally:
                signal.alarm(0)
                signal.signal(signal.SIGALRM, previous)
        except Exception:  # noqa: BLE001 - what reward code around math-verify does
            scores.append(0.0)
    return scores


def test_a_signal_based_verifier_is_called_in_the_main_thread():
    batch = fake_batch(["w1", "w2"], ["w3", "w4"])
    assert FunctionReward(verify_with_an_alarm, timeout=None)(batch).tolist() == [1.0, 1.0]
    reward = FunctionReward(verify_with_an_alarm, timeout=5.0)
    with pytest.warns(UserWarning, match="verify_with_an_alarm sets a signal handler .* called there from now on"):
        assert reward(batch).tolist() == [1.0, 1.0]  # not the 0s its guard would have made of the refusal
    assert reward.in_main_thread and reward(batch).tolist() == [1.0, 1.0]
    assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL  # put back

    async def async_verifier(completions, **kwargs):
        return verify_with_an_alarm(completions)

    rewards = Rewards([FunctionReward(async_verifier, timeout=5.0), FunctionReward(verify_with_an_alarm)])
    with pytest.warns(UserWarning, match="async_verifier sets a signal handler"):
        assert rewards(batch).tolist() == [[1.0, 1.0], [1.0, 1.0]]


# --- 'module:function' specs -------------------------------------------------------------------------------------


def test_a_spec_is_found_beside_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "beside_the_config.py").write_text(
        "def correct(completions, answer, **kwargs):\n    return [float(c == a) for c, a in zip(completions, answer)]\n"
    )
    (tmp_path / "conf" / "run.yaml").write_text("reward_funcs: [beside_the_config:correct]\n")
    monkeypatch.chdir(tmp_path)  # not the config's directory
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    config = PPOConfig.from_yaml(str(tmp_path / "conf" / "run.yaml"))
    reward = load_reward(config.reward_funcs[0], config, None, None, columns=("answer",))
    prompts = read_prompts([{"prompt": "w1", "answer": "w2"}, {"prompt": "w1", "answer": "w3"}])
    assert reward(fake_batch(prompts, ["w2", "w2"])).tolist() == [1.0, 0.0]
    assert torch.equal(reward(fake_batch(prompts, ["w3", "w3"])), torch.tensor([0.0, 1.0]))
