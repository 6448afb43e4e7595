"""fastppo: a kernel-optimized PPO trainer for RLHF of language models."""

__version__ = "0.1.0"

from fastppo import ops  # noqa: E402,F401


def __getattr__(name):
    # The trainers pull in transformers; import them only when asked for, so `fastppo.ops` stays light.
    if name in ("PPOConfig", "PPOTrainer"):
        from fastppo.ppo import config, trainer

        return {"PPOConfig": config.PPOConfig, "PPOTrainer": trainer.PPOTrainer}[name]
    if name in ("DPOConfig", "DPOTrainer"):
        from fastppo.stages import dpo

        return {"DPOConfig": dpo.DPOConfig, "DPOTrainer": dpo.DPOTrainer}[name]
    raise AttributeError(f"module 'fastppo' has no attribute {name!r}")
