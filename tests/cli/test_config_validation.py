"""`fastppo train`'s config, fuzzed: every PPOConfig field with wrong types, non-finite and out-of-range values
(generated from the dataclass's type hints and its RANGES table), through the YAML file and through --set, and
config files that are not what they should be. Each is refused with exit code 2, the field (or the file) named, no
traceback, and a previous run's directory left byte for byte as it was (even with overwrite_output_dir)."""

from __future__ import annotations

import dataclasses
import json
import math
import typing

import pytest
import yaml

from fastppo.cli.train import check_inputs
from fastppo.ppo.config import PPOConfig
from fastppo.runtime.config_base import type_options
from tests.refusal import assert_refused, previous_run, run, write_yaml

RANGES = PPOConfig.RANGES

HINTS = typing.get_type_hints(PPOConfig)
FIELDS = [f.name for f in dataclasses.fields(PPOConfig)]
# Free-form paths: their bad values are the missing, unreadable and damaged targets of test_validation_files.py.
PATH_FIELDS = {"policy_model", "tokenizer", "reward_model", "reward_tokenizer", "prompts", "output_dir", "resume_from"}
PATH_FIELDS |= {"eval_prompts", "critic_model"}
FREE_TEXT = {"run_name"}  # any string is a valid one


def kinds(name: str) -> set:
    return {typing.get_origin(o) or o for o in type_options(HINTS[name])} - {type(None)}


def outside(name: str) -> list:
    """Values just outside the field's interval (and one far below a lower bound of 0)."""
    interval, integer = RANGES.get(name), kinds(name) == {int}
    if interval is None:
        return []
    step = 1 if integer else 0.5
    values = []
    if interval.low is not None:
        values.append(interval.low if interval.low_open else interval.low - step)
        values += [-1] if interval.low == 0 and interval.low_open else []
    if interval.high is not None:
        values.append(interval.high if interval.high_open else interval.high + step)
    return values


def wrong_values(name: str) -> list[tuple[str, object]]:
    """(case id, value) for one field, from its type hint."""
    hint, types = HINTS[name], kinds(name)
    cases = [] if hint is typing.Any or type(None) in type_options(hint) else [("null", None)]
    if types == {float}:
        cases += [
            ("text", "fast"),
            ("list", [0.5]),
            ("bool", True),
            ("nan", math.nan),
            ("inf", math.inf),
            ("-inf", -math.inf),
            ("nan-text", "nan"),
            ("overflow-text", "-1e999"),
            ("overflow", 10**400),
        ]
    elif types == {int}:
        cases += [
            ("float", 2.5),
            ("text", "3"),
            ("bool", False),
            ("list", [3]),
            ("nan", math.nan),
            ("overflow", 2**70),
            ("-overflow", -(2**70)),
        ]
    elif types == {bool}:
        cases += [("text", "yes"), ("int", 1), ("list", [True])]
    elif types == {str}:
        cases += [("int", 7), ("list", ["a"]), ("bool", True), ("mapping", {"a": 1})]
        cases += [] if name in PATH_FIELDS | FREE_TEXT else [("not-a-choice", "no-such-choice")]
    elif types == {list}:
        cases += [("text", "stop"), ("mapping", {"a": 1}), ("int", 3)]
    elif types == {list, str}:  # a name or a list of names
        cases += [("int", 3), ("mapping", {"a": 1}), ("list-of-int", ["a", 3]), ("not-a-name", "")]
    elif name in ("prompts", "eval_prompts"):
        cases += [
            ("int", 3),
            ("float", 2.5),
            ("bool", True),
            ("mapping", {"a": 1}),
            ("empty-list", []),
            ("list-of-int", ["w1", 3]),
            ("empty-prompt", ["w1", ""]),
            ("blank-prompt", ["w1", " \n"]),
        ]
    elif name == "reward_funcs":
        cases += [
            ("int", 3),
            ("mapping", {"a": 1}),
            ("empty-list", []),
            ("list-of-int", ["tests.tiny_models:count_w7", 3]),
            ("no-such-path", ["/no/such/reward-model"]),
        ]
    if name == "reward_weights":
        cases += [("list-of-text", ["heavy"]), ("nan", [math.nan]), ("two-for-one", [1.0, 2.0])]
    if name == "stop_strings":
        cases += [("list-of-int", ["###", 3]), ("empty-string", [""]), ("null-item", [None]), ("nested", [["a"]])]
    return cases + [(f"range-{value}", value) for value in outside(name)]


CASES = [(name, case, value) for name in FIELDS for case, value in wrong_values(name)]


@pytest.fixture
def base(tmp_path, tiny_llama) -> dict:
    """A config `fastppo train` accepts; each case spoils one field of it."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 1}"}) + "\n" for i in range(4)))
    return {
        "policy_model": tiny_llama[0],
        "reward_model": "tests.tiny_models:count_w7",
        "prompts": str(prompts),
        "output_dir": str(tmp_path / "run"),
        "overwrite_output_dir": True,
        "steps": 1,
        "rollout_batch_size": 2,
        "mini_batch_size": 2,
        "max_new_tokens": 4,
        "max_prompt_length": 16,
        "tensorboard": False,
    }


@pytest.fixture
def run_dir(base, tmp_path):
    return previous_run(tmp_path / "run")


def test_the_base_config_is_accepted(base):
    check_inputs(PPOConfig.from_dict(base).validate())


def test_every_field_has_cases_and_every_number_a_range():
    numeric = {name for name in FIELDS if kinds(name) & {int, float}}
    assert numeric <= set(RANGES), f"fields without a range in config.RANGES: {sorted(numeric - set(RANGES))}"
    assert {name for name, _, _ in CASES} == set(FIELDS)


@pytest.mark.parametrize("name, case, value", CASES, ids=[f"{n}-{c}" for n, c, _ in CASES])
def test_wrong_value_in_the_yaml_is_refused(name, case, value, base, run_dir, tmp_path, capsys):
    config = write_yaml(tmp_path / "run.yaml", {**base, name: value})
    assert_refused(run(["train", "--config", config], capsys), name, unchanged=run_dir)


SET_CASES = [(name, *wrong_values(name)[0]) for name in FIELDS]


@pytest.mark.parametrize("name, case, value", SET_CASES, ids=[f"{n}-{c}" for n, c, _ in SET_CASES])
def test_wrong_value_in_a_set_override_is_refused(name, case, value, base, run_dir, tmp_path, capsys):
    config = write_yaml(tmp_path / "run.yaml", base)
    override = (
        f"{name}={yaml.safe_dump(value, default_flow_style=True).removesuffix(chr(10)).removesuffix('...').strip()}"
    )
    assert_refused(run(["train", "--config", config, "--set", override], capsys), name, unchanged=run_dir)


@pytest.mark.parametrize(
    "override, named",
    [
        ("steps", "key=value"),
        ("=3", "key=value"),
        ("steps=[1,", "--set steps"),
        ("steps={a: ", "--set steps"),
        ("kl_coef=: :", "--set kl_coef"),
        ("seed=!!python/object/apply:os.system ['true']", "--set seed"),
        ("no_such_key=1", "no_such_key"),
        ("steps=", "steps"),
    ],
)
def test_set_that_is_not_a_yaml_value_is_refused(override, named, base, run_dir, tmp_path, capsys):
    config = write_yaml(tmp_path / "run.yaml", base)
    assert_refused(run(["train", "--config", config, "--set", override], capsys), named, unchanged=run_dir)


def test_numbers_written_as_yaml_1_1_strings_are_read_as_numbers(base, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(base) + "learning_rate: 1e-5\nkl_coef: 5E-2\n")
    config = PPOConfig.from_yaml(str(path), ["adaptive_kl_target=6e0", "reward_clip=+1e1"]).validate()
    assert (config.learning_rate, config.kl_coef, config.adaptive_kl_target, config.reward_clip) == (
        1e-5,
        0.05,
        6.0,
        10.0,
    )


def alias_bomb(levels: int = 9) -> bytes:
    """stop_strings whose items expand to 9**9 strings if anything walks them whole (a repr, a deep copy)."""
    items = ['&a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    items += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return f"stop_strings: [{', '.join(items)}]\n".encode()


# The whole file: (content, what the message names). None: no file; "dir": a directory.
WHOLE_FILES = {
    "missing": (None, "does not exist"),
    "a-directory": ("dir", "is not a file"),
    "binary": (bytes(range(256)) * 4, "not UTF-8"),
    "latin-1": ("steps: 2  # café\n".encode("latin-1"), "not UTF-8"),
    "nul-byte": (b"steps: 2\n\x00\n", "not valid YAML"),
    "not-yaml": (b"steps: [1, 2\n", "not valid YAML"),
    "a-list": (b"- steps\n- 2\n", "expected a mapping"),
    "a-scalar": (b"hello\n", "expected a mapping"),
    "empty": (b"", "policy_model: missing"),
    "too-big": (b"# " + b"x" * (9 << 20) + b"\n", "MB"),
}
# Appended to the good base config: the one problem of an otherwise good file.
APPENDED = {
    "non-string-key": (b"1: 2\n", "unknown key"),
    "unhashable-key": (b"? [a, b]\n: 1\n", "not valid YAML"),
    "python-tag": (b"seed: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    "nested-too-deeply": (b"seed: " + b"[" * 50_000 + b"]" * 50_000 + b"\n", "run.yaml"),
    "many-unknown-keys": ("".join(f"key{i}: {i}\n" for i in range(10_000)).encode(), "and 9995 more"),
    "huge-value": (b"seed: " + b"9" * 2_000_000 + b"x\n", "seed must be int"),
    "huge-number": (b"seed: " + b"9" * 5000 + b"\n", "run.yaml"),
    "big-number": (b"seed: " + b"9" * 4000 + b"\n", "seed must fit in 64 bits"),
    "alias-bomb": (alias_bomb(), "stop_strings[0]"),
}


@pytest.mark.parametrize("case", [*WHOLE_FILES, *APPENDED])
def test_config_file_that_is_not_a_config_is_refused(case, base, run_dir, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    if case in APPENDED:
        content, named = APPENDED[case]
        path.write_bytes(yaml.safe_dump({k: v for k, v in base.items() if k != "seed"}).encode() + content)
    else:
        content, named = WHOLE_FILES[case]
        if content == "dir":
            path.mkdir()
        elif content is not None:
            path.write_bytes(content)
    assert_refused(run(["train", "--config", path], capsys), named, unchanged=run_dir)
