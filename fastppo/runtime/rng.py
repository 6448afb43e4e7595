"""Every random number generator a run draws from: seeding them, and their complete state for a checkpoint."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG the run draws from, completely (the Gaussian caches too), as tensors and plain values (loadable
    with weights_only=True)."""
    _, mt, gauss_next = random.getstate()
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(mt),
        "python_gauss_next": gauss_next,
        "numpy": torch.from_numpy(keys.astype(np.int64)),
        "numpy_pos": int(position),
        "numpy_gauss": [int(has_gauss), float(cached_gaussian)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state.get("python_gauss_next")))
    has_gauss, cached_gaussian = state.get("numpy_gauss", (0, 0.0))
    np.random.set_state(
        (
            "MT19937",
            state["numpy"].numpy().astype(np.uint32),
            state["numpy_pos"],
            int(has_gauss),
            float(cached_gaussian),
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
