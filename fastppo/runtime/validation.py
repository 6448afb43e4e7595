"""Input checks shared by `fastppo train`, `sft` and `reward-model`: numbers, output directories, JSONL files and
model directories, each answered before anything loads or is written.

Every check raises `InputError` naming the config field (or command-line flag), or the file and line. Values are
quoted through `short`, so a huge input (a 50 MB config, a million-key mapping) never makes a huge message.
"""

from __future__ import annotations

import json
import math
import os
import re
import reprlib
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from safetensors import SafetensorError

from fastppo.runtime.errors import InputError
from fastppo.runtime.run_lock import LOCK_FILE

INT64_MAX = 2**63 - 1  # every integer ends up in a torch or numpy int64 (seeds, sizes, step counts)

_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict, _repr.maxlevel = 60, 60, 4, 4, 2


def short(value) -> str:
    """A repr of `value` cut to about 80 characters, in time independent of its size."""
    return _repr.repr(value)


def clip(text: str, limit: int = 300) -> str:
    """An error text (another library's, often several lines) on one line, cut to `limit` characters."""
    text = " ".join(str(text)[: 4 * limit].split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- numbers ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """The finite numbers a field accepts: from `low` to `high` (None: unbounded), ends excluded when `*_open`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, x: float) -> bool:
        above = self.low is None or (x > self.low if self.low_open else x >= self.low)
        below = self.high is None or (x < self.high if self.high_open else x <= self.high)
        return above and below

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return f"lie in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"be {'>' if self.low_open else '>='} {self.low}"
        if self.high is not None:
            return f"be {'<' if self.high_open else '<='} {self.high}"
        return "be finite"


POSITIVE, NON_NEGATIVE, FRACTION = Interval(0, low_open=True), Interval(0), Interval(0, 1)


def check_finite(name: str, value) -> None:
    """A float field's value (an int or a float) is a finite float."""
    try:
        finite = math.isfinite(float(value))
    except OverflowError:
        finite = False
    if not finite:
        raise InputError(f"{name} must be a finite number, got {short(value)}")


def check_int64(name: str, value: int) -> None:
    if not -INT64_MAX - 1 <= value <= INT64_MAX:
        raise InputError(f"{name} must fit in 64 bits (|{name}| < 2**63), got {short(value)}")


def check_range(name: str, value, interval: Interval, nullable: bool = False) -> None:
    if value is None and nullable:
        return
    if value not in interval:
        raise InputError(f"{name} must {interval.describe()}{' or null' if nullable else ''}, got {short(value)}")


def check_number(name: str, value, interval: Interval, integer: bool = False) -> None:
    """Type, finiteness (or 64-bit range) and interval of one number, e.g. a command-line option's value."""
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise InputError(f"{name} must be {'an integer' if integer else 'a number'}, got {short(value)}")
    if integer:
        check_int64(name, value)
    else:
        check_finite(name, value)
    check_range(name, value, interval)


def is_callable_spec(spec: str) -> bool:
    """'package.module:function' (and not a Windows-style or existing path)."""
    module, sep, function = spec.partition(":")
    return bool(sep) and function.isidentifier() and not os.path.exists(spec) and "/" not in module


def parse_float(value):
    """`value` as a float when it is a string that spells one (YAML 1.1 reads `1e-5` as a string), else unchanged."""
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return value
    return value


# --- output directories -----------------------------------------------------------------------------------------


def check_writable_dir(name: str, path: str) -> None:
    """`path` is a directory we can write into, or can be created: checked without creating anything."""
    if not isinstance(path, str) or not path.strip():
        raise InputError(f"{name} must be a directory path, got {short(path)}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{name}: {path} is a file, not a directory")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise InputError(f"{name}: {path} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{name}: {existing} is not writable")


def same_directory(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def refuse_non_empty_dir(name: str, path: str) -> None:
    """For commands that write a whole run directory and cannot resume: an existing one is somebody's run (a lock file
    a killed run left behind is not)."""
    found = sorted(n for n in os.listdir(path) if n != LOCK_FILE) if os.path.isdir(path) else []
    refuse_to_overwrite(name, path, "a previous run", found, "remove it first")


def refuse_to_overwrite(name: str, path: str, what: str, found: list[str], how_to_allow: str) -> None:
    """Stop when `found` (the `what` that `path` already holds) is not empty: nothing a user has is overwritten
    unasked."""
    if found:
        listed = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise InputError(f"{name} {path} already holds {what} ({listed}): {how_to_allow}, or choose another directory")


# --- JSONL ------------------------------------------------------------------------------------------------------


def check_readable_file(name: str, path) -> None:
    if not isinstance(path, str) or not path:
        raise InputError(f"{name} must be a file path, got {short(path)}")
    if not os.path.exists(path):
        raise InputError(f"{name}: {path}: no such file")
    if not os.path.isfile(path):
        raise InputError(f"{name}: {path} is not a file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{name}: {path} is not readable")


def read_jsonl(path: str, name: str = "data") -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file; an undecodable byte, a line that is not JSON,
    or one that is not an object stops with file:line."""
    check_readable_file(name, path)
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a BOM from a Windows editor is fine
                except UnicodeDecodeError as error:
                    raise InputError(
                        f"{path}:{number}: not UTF-8 text (byte {raw[error.start]:#04x} at column "
                        f"{error.start + 1}); is this the right file?"
                    ) from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line.rstrip("\r\n"))
                except (json.JSONDecodeError, RecursionError) as error:
                    reason = error.msg if isinstance(error, json.JSONDecodeError) else "nested too deeply"
                    raise InputError(f"{path}:{number}: not valid JSON ({reason})") from None
                if not isinstance(record, dict):
                    raise InputError(f"{path}:{number}: expected a JSON object, got {json_type(record)}")
                yield number, record
    except OSError as error:
        raise InputError(f"{name}: cannot read {path} ({error.strerror or error})") from None


class Record(dict):
    """A record of a data file; `.where` is its file:line (or its index in a list), for what is found after reading
    it (a pair without a preference, one max_length empties)."""

    where = "?"


def located(values: dict, where: str) -> Record:
    found = Record(values)
    found.where = where
    return found


def read_records(path: str, fields: Sequence[str], name: str = "--data") -> list[Record]:
    """The records of a JSONL file, each an object with a non-empty string for every one of `fields`; blank lines
    skipped; any other line (not UTF-8, not JSON, a field missing or empty) stops with file:line."""
    records = []
    for line_number, line in read_jsonl(path, name):
        where = f"{path}:{line_number}"
        records.append(located({field: require_text(where, field, line.get(field)) for field in fields}, where))
    if not records:
        raise InputError(f"{path}: no records")
    return records


def json_type(value) -> str:
    """What JSON calls the type of a parsed value."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def require_text(where: str, field: str, value) -> str:
    """A record's `field` is a string with something besides whitespace in it."""
    if not isinstance(value, str):
        problem = "is missing" if value is None else f"must be a string, got {json_type(value)}"
        raise InputError(f'{where}: field "{field}" {problem}')
    if not value.strip():
        raise InputError(f'{where}: field "{field}" is empty')
    return value


# --- model directories ------------------------------------------------------------------------------------------

# What loading a damaged model or tokenizer raises (bad JSON, a truncated safetensors file, config sizes that do not
# match the weights): reported as that file's problem, not as a traceback.
LOAD_ERRORS = (OSError, ValueError, RuntimeError, SafetensorError)

_EMBEDDING = re.compile(r"(embed_tokens|wte|embed_in|word_embeddings)\.weight$")
_HIDDEN_KEYS, _CONTEXT_KEYS = ("hidden_size", "n_embd", "d_model"), ("max_position_embeddings", "n_positions", "n_ctx")


def refuse_adapter_dir(name: str, path: str) -> None:
    """A LoRA adapter's directory (adapter_config.json) is not a model: say what it is and how to use it."""
    file = os.path.join(path, "adapter_config.json") if isinstance(path, str) else ""
    if not os.path.isfile(file):
        return
    try:
        with open(file, encoding="utf-8") as f:
            adapter = json.load(f)
    except (OSError, ValueError):
        adapter = {}
    adapter = adapter if isinstance(adapter, dict) else {}
    base, rank = adapter.get("base_model_name_or_path") or "its base model", adapter.get("r")
    raise InputError(
        f"{name}: {path} is a LoRA adapter (adapter_config.json{f', rank {rank}' if rank else ''}) of {base}, not a "
        f"model. Merge it into its base first (peft: PeftModel.from_pretrained(<{base} loaded>, '{path}')"
        ".merge_and_unload().save_pretrained('merged')) and give the merged directory; lora_rank then trains new "
        "adapters on it"
    )


def read_model_config(name: str, path: str) -> dict:
    """The parsed config.json of a model directory `path` (a LoRA adapter's directory is refused, saying so)."""
    if not os.path.isdir(path):
        raise InputError(f"{name}: {path} is not a directory (a model is a directory with config.json)")
    refuse_adapter_dir(name, path)
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise InputError(f"{name}: {path} has no config.json: not a model directory")
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise InputError(f"{name}: {file} is not valid JSON ({clip(error)})") from None
    if not isinstance(config, dict):
        raise InputError(f"{name}: {file} must hold a JSON object, got {type(config).__name__}")
    return config


def safetensors_header(name: str, file: str) -> dict:
    """The tensor table of a .safetensors file, after checking that the file is exactly as long as it says."""
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            (header_size,) = struct.unpack("<Q", f.read(8).ljust(8, b"\0"))
            if 8 + header_size > size or header_size > 100 << 20:  # safetensors caps its header at 100 MB
                raise InputError(f"{name}: {file}: truncated or not a safetensors file ({size} bytes)")
            header = json.loads(f.read(header_size))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{name}: {file}: unreadable safetensors header ({clip(error)})") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"} if isinstance(header, dict) else None
    try:
        end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
    except (AttributeError, KeyError, TypeError, IndexError):
        raise InputError(f"{name}: {file}: damaged safetensors header") from None
    if 8 + header_size + end != size:
        raise InputError(
            f"{name}: {file}: truncated or damaged: its header describes {8 + header_size + end} bytes, "
            f"the file has {size}"
        )
    return tensors


def check_model_dir(name: str, path: str, need_weights: bool = True) -> dict:
    """A model directory's config.json, after checking its safetensors files are whole and its input embedding has
    the shape config.json gives (vocab_size x hidden size). Reads headers only: no weights load."""
    config = read_model_config(name, path)
    weights = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if need_weights and not weights and not any(f.endswith(".bin") for f in os.listdir(path)):
        raise InputError(f"{name}: {path} has no weights (*.safetensors or *.bin)")
    vocab = config.get("vocab_size")
    hidden = next((config[k] for k in _HIDDEN_KEYS if isinstance(config.get(k), int)), None)
    for file in weights:
        for tensor_name, tensor in safetensors_header(name, os.path.join(path, file)).items():
            shape = tensor.get("shape") if isinstance(tensor, dict) else None
            if _EMBEDDING.search(tensor_name) and vocab and hidden and shape != [vocab, hidden]:
                raise InputError(
                    f"{name}: {path}/config.json says vocab_size {vocab} x hidden size {hidden}, but "
                    f"{file} holds {tensor_name} of shape {shape}"
                )
    return config


def context_length(model_config: dict) -> int | None:
    """The longest sequence (prompt + response) the model's position table covers, when its config says."""
    for config in (model_config, model_config.get("text_config") or {}):
        for key in _CONTEXT_KEYS:
            if isinstance(config.get(key), int) and config[key] > 0:
                return config[key]
    return None
