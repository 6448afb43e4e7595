"""fastppo's benchmark suite: `python -m bench` (or `fastppo bench`) from the repository root."""
