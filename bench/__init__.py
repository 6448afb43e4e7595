"""fastppo's benchmark suite: `python -m bench` from the repository root (not part of the installed package)."""
