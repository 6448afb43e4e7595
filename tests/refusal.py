"""Helpers of the bad-input suites (test_validation_*.py): run a command in-process and check it refused as the
README promises: exit code 2, a short message on stderr naming the culprit, no traceback, nothing written."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from fastppo.cli import main


def snapshot(directory: Path) -> dict[str, bytes | None]:
    """Every file under `directory` with its bytes (folders as None): compared before and after a refused run."""
    found: dict[str, bytes | None] = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            found[os.path.relpath(os.path.join(root, name), directory)] = None
        for name in files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, directory)] = Path(path).read_bytes()
    return found


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """`fastppo ARGV` in this process: (exit code, stdout, stderr). An argparse error exits through SystemExit."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(result: tuple[int, str, str], *names, unchanged: tuple[Path, dict] | None = None) -> None:
    """Exit 2, every one of `names` (a field, a flag, a file or file:line) in the message, no traceback, a message
    of reasonable size, and the directory `unchanged[0]` still exactly `unchanged[1]`."""
    code, out, err = result
    assert code == 2, f"exit code {code}, stderr: {err[-1500:]}"
    assert "Traceback" not in out + err, err[-3000:]
    for name in names:
        assert str(name) in err, f"{name!r} not named in: {err[-1500:]}"
    assert len(err) < 4000, f"a {len(err)}-character message"
    if unchanged is not None:
        directory, before = unchanged
        assert snapshot(directory) == before, f"{directory} was changed"


def write_yaml(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def previous_run(directory: Path) -> tuple[Path, dict]:
    """A run directory a user already has: a previous run's metrics, a checkpoint, a file of theirs."""
    (directory / "checkpoint-3").mkdir(parents=True)
    (directory / "checkpoint-3" / "model.safetensors").write_bytes(b"weights of step 3")
    (directory / "metrics.jsonl").write_text(json.dumps({"step": 3, "reward/score_mean": 0.5}) + "\n")
    (directory / "notes.txt").write_text("mine\n")
    return directory, snapshot(directory)


def previous_model(directory: Path) -> tuple[Path, dict]:
    """An output directory holding a model `fastppo sft` / `reward-model` wrote before."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text('{"model_type": "llama"}\n')
    (directory / "model.safetensors").write_bytes(b"weights")
    return directory, snapshot(directory)


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


# --- damaged model directories ----------------------------------------------------------------------------------


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def _truncate(file: Path, keep: float) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


# name -> (how to damage a copy of a good model directory, what the message names besides the field)
MODEL_DAMAGE = {
    "a-file": (lambda p: (shutil.rmtree(p), p.write_text("not a directory")), "is not a directory"),
    "no-config": (lambda p: (p / "config.json").unlink(), "config.json"),
    "config-not-json": (lambda p: (p / "config.json").write_text("{oops"), "config.json"),
    "config-binary": (lambda p: (p / "config.json").write_bytes(bytes(range(256))), "config.json"),
    "config-a-list": (lambda p: (p / "config.json").write_text("[1, 2]"), "config.json"),
    "no-weights": (lambda p: (p / "model.safetensors").unlink(), "no weights"),
    "weights-truncated": (lambda p: _truncate(p / "model.safetensors", 0.5), "model.safetensors"),
    "weights-empty": (lambda p: (p / "model.safetensors").write_bytes(b""), "model.safetensors"),
    "weights-garbage": (lambda p: (p / "model.safetensors").write_bytes(os.urandom(64)), "model.safetensors"),
    "weights-header-garbage": (
        lambda p: (p / "model.safetensors").write_bytes((16).to_bytes(8, "little") + b"\xff" * 16),
        "model.safetensors",
    ),
    "sizes-not-matching-weights": (lambda p: _edit_config(p, vocab_size=500), "vocab_size"),
}


def damaged_copy(good: str, where: Path, damage: str) -> Path:
    path = where / f"model-{damage}"
    shutil.copytree(good, path)
    MODEL_DAMAGE[damage][0](path)
    return path


# --- malformed JSONL lines -----------------------------------------------------------------------------------------


def malformed_lines(fields: tuple[str, ...]) -> dict[str, bytes]:
    """One bad line per malformation, for records that need a string in each of `fields`."""
    good = {field: "w1 w2" for field in fields}

    def line(**changes) -> bytes:
        return json.dumps({k: v for k, v in {**good, **changes}.items() if v is not ...}).encode()

    last = fields[-1]
    return {
        "not-json": b'{"' + fields[0].encode() + b'": oops}',
        "cut-short": line()[:-3],
        "an-array": b'["w1", "w2"]',
        "a-string": b'"w1 w2"',
        "a-number": b"3",
        "null": b"null",
        "not-utf8": line()[:-2] + b'\xff\xfe"}',
        "nested-too-deeply": b"[" * 100_000,
        "field-missing": line(**{last: ...}),
        "field-empty": line(**{last: ""}),
        "field-whitespace": line(**{last: " \t "}),
        "field-a-number": line(**{last: 3}),
        "field-null": line(**{last: None}),
        "field-a-list": line(**{last: ["w1"]}),
        "field-an-object": line(**{last: {"text": "w1"}}),
    }


def good_line(fields: tuple[str, ...]) -> bytes:
    """A valid record: a different text in each field (a pair's chosen and rejected must differ)."""
    return json.dumps({field: f"w1 w{i + 2}" for i, field in enumerate(fields)}).encode()
