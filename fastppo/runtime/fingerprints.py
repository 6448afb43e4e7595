"""Digests a checkpoint records so that a resume can tell what it is given now from what the run was trained with:
the prompts, and the weights of a model directory (the KL reference).

Both are cheap. The prompts' digest is of their texts in order: the sampler's saved state is a position in a
permutation of their indices, so the same prompts in another order are, to it, other prompts. A model directory's
digest reads a few KiB per tensor, not the weights: config.json, each safetensors file's header and size, and three
4 KiB windows (start, middle, end) of every tensor's bytes (of a .bin file, 64 windows spread over it). Two
checkpoints of one architecture have equal headers but different bytes in every trained tensor, so their digests
differ; the same files moved elsewhere keep theirs.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

WINDOW = 4096


def prompts_digest(prompts: list[str]) -> str:
    """sha256 of the prompt texts, in order (each length-prefixed, so no two lists collide by concatenation)."""
    digest = hashlib.sha256()
    for prompt in prompts:
        data = str(prompt).encode("utf-8", errors="surrogatepass")
        digest.update(struct.pack("<Q", len(data)))
        digest.update(data)
    return digest.hexdigest()


def weights_digest(path: str) -> str | None:
    """A digest of the model directory `path` (see the module's docstring); None when it is no directory."""
    if not isinstance(path, str) or not os.path.isdir(path):
        return None
    digest = hashlib.sha256()
    names = sorted(os.listdir(path))
    for name in ["config.json"] + [n for n in names if n.endswith((".safetensors", ".bin"))]:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        digest.update(name.encode() + struct.pack("<Q", os.path.getsize(file)))
        with open(file, "rb") as f:
            if name.endswith(".safetensors"):
                _safetensors_samples(f, digest)
            elif name.endswith(".bin"):
                _spread_samples(f, os.path.getsize(file), digest)
            else:
                digest.update(f.read())
    return digest.hexdigest()


def _safetensors_samples(f, digest) -> None:
    (header_size,) = struct.unpack("<Q", f.read(8).ljust(8, b"\0"))
    header = f.read(min(header_size, 100 << 20))
    digest.update(header)
    try:
        tensors = json.loads(header)
        ranges = sorted(v["data_offsets"] for k, v in tensors.items() if k != "__metadata__")
    except (ValueError, TypeError, KeyError, AttributeError):
        return  # a damaged file: its header and size are in the digest already
    base = 8 + header_size
    for start, end in ranges:
        for offset in sorted({start, max(start, (start + end - WINDOW) // 2), max(start, end - WINDOW)}):
            f.seek(base + offset)
            digest.update(f.read(min(WINDOW, end - offset)))


def _spread_samples(f, size: int, digest, count: int = 64) -> None:
    for i in range(count):
        f.seek(max(0, (size - WINDOW) * i // (count - 1)))
        digest.update(f.read(WINDOW))
