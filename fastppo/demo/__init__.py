"""The built-in offline RLHF demo: a generated task, a tokenizer built on the spot, and the full pipeline.

`fastppo demo` (and `fastppo train` with no config) runs SFT, reward modelling, PPO and a gold-reward evaluation
on the task in `task.py`, with no download; see `pipeline.py`.
"""
