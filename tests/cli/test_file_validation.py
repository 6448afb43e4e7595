"""The files `fastppo train`, `sft` and `reward-model` read and write, fuzzed: every path option missing, of the wrong
kind or damaged (model directories, reward modules, checkpoints), data files with every malformation, output
directories that cannot be used or hold work. Each is refused with exit code 2, the option or file:line named, no
traceback, and a directory the user already had left byte for byte as it was."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from fastppo.cli.train import check_inputs
from tests.refusal import (
    MODEL_DAMAGE,
    assert_refused,
    damaged_copy,
    good_line,
    malformed_lines,
    previous_model,
    previous_run,
    run,
    snapshot,
    write_lines,
    write_yaml,
)

COMMANDS = {"train": ("prompt",), "sft": ("prompt", "response"), "reward-model": ("prompt", "chosen", "rejected")}
PROMPT_MESSAGES = {
    "messages-empty": {"messages": []},
    "messages-a-string": {"messages": "hello"},
    "message-a-number": {"messages": [3]},
    "message-without-role": {"messages": [{"content": "w1"}]},
    "message-without-content": {"messages": [{"role": "user"}]},
    "message-content-a-number": {"messages": [{"role": "user", "content": 3}]},
}


@pytest.fixture
def train(tmp_path, tiny_llama):
    """(base config, previous run directory and its snapshot): `fastppo train` accepts the config; each case spoils
    one thing of it."""
    prompts = write_lines(tmp_path / "prompts.jsonl", [good_line(("prompt",))] * 4)
    config = {
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
    return config, previous_run(tmp_path / "run")


def run_train(config: dict, tmp_path, capsys, *extra):
    return run(["train", "--config", write_yaml(tmp_path / "run.yaml", config), *extra], capsys)


def supervised_argv(command: str, tmp_path, tiny_llama, data=None, **options) -> list:
    """`fastppo sft|reward-model` on good data into a directory holding a previous model, --overwrite-output-dir
    given: whatever is refused, it is not for the output directory, and that directory must stay as it was."""
    if data is None:
        data = write_lines(tmp_path / "data.jsonl", [good_line(COMMANDS[command])] * 4)
    values = {"model": tiny_llama[0], "data": data, "output-dir": tmp_path / "out", **options}
    argv = [command, "--overwrite-output-dir"]
    for key, value in values.items():
        argv += [f"--{key}", value] if value is not None else []
    return argv


@pytest.fixture
def out(tmp_path):
    return previous_model(tmp_path / "out")


def test_the_bases_are_accepted(train, tmp_path, tiny_llama, capsys):
    from fastppo.ppo.config import PPOConfig

    check_inputs(PPOConfig.from_dict(train[0]).validate())
    for command in ("sft", "reward-model"):  # one step each
        code, _, err = run(supervised_argv(command, tmp_path, tiny_llama, epochs="1e-9"), capsys)
        assert code == 0, err[-2000:]


# --- data files -------------------------------------------------------------------------------------------------

DATA_CASES = [(command, case) for command, fields in COMMANDS.items() for case in malformed_lines(fields)]
DATA_CASES += [("train", case) for case in PROMPT_MESSAGES]


@pytest.mark.parametrize("command, case", DATA_CASES, ids=[f"{c}-{k}" for c, k in DATA_CASES])
def test_malformed_line_is_named_by_file_and_line(command, case, train, out, tmp_path, tiny_llama, capsys):
    fields = COMMANDS[command]
    bad = json.dumps(PROMPT_MESSAGES[case]).encode() if case in PROMPT_MESSAGES else malformed_lines(fields)[case]
    data = write_lines(tmp_path / "data.jsonl", [good_line(fields), b"", bad, good_line(fields)])
    if command == "train":
        assert_refused(run_train({**train[0], "prompts": str(data)}, tmp_path, capsys), f"{data}:3", unchanged=train[1])
    else:
        result = run(supervised_argv(command, tmp_path, tiny_llama, data), capsys)
        assert_refused(result, f"{data}:3", unchanged=out)


FILE_CASES = {"empty": b"", "blank-lines": b"\n  \n\t\n", "binary": bytes(range(256)) * 8, "a-directory": None}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", [*FILE_CASES, "missing"])
def test_data_file_that_is_not_data_is_refused(command, case, train, out, tmp_path, tiny_llama, capsys):
    data = tmp_path / "data.jsonl"
    if case == "a-directory":
        data.mkdir()
    elif case != "missing":
        data.write_bytes(FILE_CASES[case])
    if command == "train":
        assert_refused(run_train({**train[0], "prompts": str(data)}, tmp_path, capsys), data, unchanged=train[1])
    else:
        assert_refused(run(supervised_argv(command, tmp_path, tiny_llama, data), capsys), data, unchanged=out)


# --- model directories ------------------------------------------------------------------------------------------

MODEL_CASES = [
    (command, option, damage)
    for command, option in [
        ("train", "policy_model"),
        ("train", "reward_model"),
        ("sft", "model"),
        ("reward-model", "model"),
    ]
    for damage in [*MODEL_DAMAGE, "missing"]
    if not (command != "train" and damage == "no-weights")
]


@pytest.mark.parametrize("command, option, damage", MODEL_CASES, ids=["-".join(c) for c in MODEL_CASES])
def test_missing_or_damaged_model_is_refused_before_loading(
    command, option, damage, train, out, tmp_path, tiny_llama, capsys
):
    good = tiny_llama[1] if option == "reward_model" else tiny_llama[0]
    path = tmp_path / "no-such-model" if damage == "missing" else damaged_copy(good, tmp_path, damage)
    named = "does not exist" if damage == "missing" and command == "train" else MODEL_DAMAGE.get(damage, ("", ""))[1]
    if command == "train":
        result = run_train({**train[0], option: str(path)}, tmp_path, capsys)
        assert_refused(result, option, named, unchanged=train[1])
    else:
        result = run(supervised_argv(command, tmp_path, tiny_llama, model=path), capsys)
        assert_refused(result, path if damage == "missing" else option, named, unchanged=out)


@pytest.mark.parametrize("command", COMMANDS)
def test_damaged_tokenizer_is_refused_naming_it(command, train, out, tmp_path, tiny_llama, capsys):
    tokenizer = damaged_copy(tiny_llama[0], tmp_path, "no-config")
    (tokenizer / "tokenizer.json").write_text('{"version": "1.0", "model": oops')
    if command == "train":
        result = run_train({**train[0], "tokenizer": str(tokenizer)}, tmp_path, capsys)
        assert_refused(result, tokenizer, unchanged=train[1])
    else:
        result = run(supervised_argv(command, tmp_path, tiny_llama, tokenizer=tokenizer), capsys)
        assert_refused(result, tokenizer, unchanged=out)


@pytest.mark.parametrize("command", ["sft", "reward-model"])
def test_examples_longer_than_the_model_context_are_refused(command, out, tmp_path, tiny_llama, capsys):
    model = damaged_copy(tiny_llama[0], tmp_path, "no-weights")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8}))
    fields = COMMANDS[command]
    long = {f: " ".join([f"w{i + 1}"] * 12) for i, f in enumerate(fields)}  # a pair's texts differ
    data = write_lines(tmp_path / "data.jsonl", [json.dumps(long).encode()])
    result = run(supervised_argv(command, tmp_path, tiny_llama, data, model=model), capsys)
    assert_refused(result, "max_length", "8 positions", unchanged=out)


@pytest.mark.parametrize("field", ["max_new_tokens", "max_prompt_length"])
def test_train_longer_than_the_model_context_is_refused(field, train, tmp_path, tiny_llama, capsys):
    model = shutil.copytree(tiny_llama[0], tmp_path / "short-context")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    result = run_train({**train[0], "policy_model": str(model), field: 100}, tmp_path, capsys)
    assert_refused(result, field, "64 positions", unchanged=train[1])


# --- reward functions -------------------------------------------------------------------------------------------

REWARD_MODULES = {
    "syntax-error": ("def score(prompts, responses)\n    return [0.0] * len(prompts)\n", "syntax error at"),
    "raises-on-import": ("raise RuntimeError('no GPU here')\n", "RuntimeError: no GPU here"),
    "exits-on-import": ("import sys\nsys.exit(3)\n", "SystemExit"),
    "no-such-function": ("def other(prompts, responses):\n    return []\n", "has no function 'score'"),
    "not-callable": ("score = 3\n", "has no function 'score'"),
    "no-such-module": (None, "cannot import module"),
}


@pytest.mark.parametrize("case", REWARD_MODULES)
def test_reward_module_that_cannot_be_imported_is_refused(case, train, tmp_path, monkeypatch, capsys):
    source, named = REWARD_MODULES[case]
    module = f"fuzz_reward_{case.replace('-', '_')}"
    if source is not None:
        (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.chdir(tmp_path)  # found in the working directory, as `python -m` would
    result = run_train({**train[0], "reward_model": f"{module}:score"}, tmp_path, capsys)
    assert_refused(result, "reward_model", module, named, unchanged=train[1])


# --- output directories -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", ["a-file", "under-a-file", "empty-path"])
def test_unusable_output_dir_is_refused(command, case, train, tmp_path, tiny_llama, capsys):
    target = tmp_path / "taken"
    target.write_text("a file of mine\n")
    path = {"a-file": target, "under-a-file": target / "run", "empty-path": ""}[case]
    if command == "train":
        result = run_train({**train[0], "output_dir": str(path)}, tmp_path, capsys)
        assert_refused(result, "output_dir", unchanged=train[1])
    else:
        assert_refused(
            run(supervised_argv(command, tmp_path, tiny_llama, **{"output-dir": path}), capsys), "output_dir"
        )
    assert target.read_text() == "a file of mine\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
@pytest.mark.parametrize("command", COMMANDS)
def test_unwritable_output_dir_is_refused(command, train, tmp_path, tiny_llama, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if command == "train":
        assert_refused(run_train({**train[0], "output_dir": str(locked / "run")}, tmp_path, capsys), "not writable")
    else:
        argv = supervised_argv(command, tmp_path, tiny_llama, **{"output-dir": locked / "run"})
        assert_refused(run(argv, capsys), "not writable")


@pytest.mark.parametrize("holds", ["metrics-only", "checkpoints"])
def test_train_refuses_a_previous_run_without_overwrite(holds, train, tmp_path, capsys):
    run_dir, _ = train[1]
    if holds == "metrics-only":
        shutil.rmtree(run_dir / "checkpoint-3")
    before = snapshot(run_dir)
    result = run_train({**train[0], "overwrite_output_dir": False}, tmp_path, capsys)
    assert_refused(result, "output_dir", "metrics.jsonl", "overwrite_output_dir", unchanged=(run_dir, before))


@pytest.mark.parametrize("command", ["sft", "reward-model"])
def test_supervised_commands_refuse_a_previous_model_without_overwrite(command, out, tmp_path, tiny_llama, capsys):
    argv = [a for a in supervised_argv(command, tmp_path, tiny_llama) if a != "--overwrite-output-dir"]
    assert_refused(run(argv, capsys), "output_dir", "config.json", "--overwrite-output-dir", unchanged=out)


# --- options of sft and reward-model ----------------------------------------------------------------------------

INT_VALUES, FLOAT_VALUES = ["0", "-1", "2.5", "ten", str(2**70)], ["0", "-1", "nan", "inf", "-inf", "1e999", "ten"]
OPTION_CASES = [
    (command, option, value)
    for command in ("sft", "reward-model")
    for option, values in [
        ("epochs", FLOAT_VALUES),
        ("batch-size", INT_VALUES),
        ("learning-rate", FLOAT_VALUES),
        ("max-length", INT_VALUES),
        ("seed", ["-1", "1.5", str(2**64)]),
    ]
    + ([("eval-fraction", ["1", "-0.1", "nan", "inf"])] if command == "reward-model" else [])
    for value in values
]


@pytest.mark.parametrize("command, option, value", OPTION_CASES, ids=["-".join(c) for c in OPTION_CASES])
def test_bad_option_value_is_refused(command, option, value, out, tmp_path, tiny_llama, capsys):
    result = run(supervised_argv(command, tmp_path, tiny_llama, **{option: value}), capsys)
    assert_refused(result, option.replace("-", "_"), unchanged=out)


# --- resume -------------------------------------------------------------------------------------------------------


def fake_checkpoint(directory, model_dir: str, state: bytes | None = None) -> str:
    """A checkpoint of a tiny Llama, written the way checkpoint.py writes one (manifest last)."""
    shutil.copytree(model_dir, directory)
    save_file({"weight": torch.zeros(1, 32), "bias": torch.zeros(1)}, str(directory / "value_head.safetensors"))
    (directory / "trainer_state.pt").write_bytes(state if state is not None else b"not a pickle")
    files = {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in os.listdir(directory)}
    (directory / "manifest.json").write_text(json.dumps({"step": 1, "files": files}))
    return str(directory)


RESUME_CASES = {
    "no-checkpoint": (lambda c: os.remove(os.path.join(c, "manifest.json")), "no valid checkpoint"),
    "checksum": (lambda c: open(os.path.join(c, "config.json"), "a").write(" "), "no valid checkpoint"),
    "manifest-not-json": (lambda c: open(os.path.join(c, "manifest.json"), "w").write("{oops"), "no valid"),
    "manifest-a-list": (lambda c: open(os.path.join(c, "manifest.json"), "w").write("[]"), "no valid"),
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_damaged_checkpoint_is_refused_before_loading(case, train, tmp_path, tiny_llama, capsys):
    run_dir, _ = train[1]
    checkpoint = fake_checkpoint(run_dir / "checkpoint-1", tiny_llama[0])
    RESUME_CASES[case][0](checkpoint)
    before = snapshot(run_dir)
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        result = run_train(train[0], tmp_path, capsys, "--resume")
    assert_refused(result, "resume_from", RESUME_CASES[case][1], unchanged=(run_dir, before))


@pytest.mark.parametrize("case", ["state-not-a-pickle", "state-not-a-trainer-state", "weights-of-another-size"])
def test_checkpoint_that_does_not_load_is_refused_naming_it(case, train, tmp_path, tiny_llama, capsys):
    run_dir, _ = train[1]
    torch.save({"step": 1}, tmp_path / "state.pt")  # loads, but is not a whole trainer state
    state = None if case == "state-not-a-pickle" else (tmp_path / "state.pt").read_bytes()
    model = tiny_llama[0]
    if case == "weights-of-another-size":
        from tests.tiny_models import save_tiny_models

        model = save_tiny_models(tmp_path / "other", "llama", hidden=16)[0]
    checkpoint = fake_checkpoint(run_dir / "checkpoint-1", model, state)
    before = snapshot(run_dir)
    named = "cannot load the weights" if case == "weights-of-another-size" else "trainer_state.pt"
    with pytest.warns(UserWarning, match="skipping damaged checkpoint .*checkpoint-3"):  # the previous run's
        result = run_train(train[0], tmp_path, capsys, "--resume")
    assert_refused(result, "resume_from", checkpoint, named, unchanged=(run_dir, before))
