"""PPO for RLHF: the loop (`trainer.py`, one iteration per `step()`) and each of its steps.

config.py       PPOConfig, every knob of a run (trl_keys.py: TRL's names for them, refused with fastppo's)
batch.py        RolloutBatch, what the steps read and fill
rewards.py      step 2: reward models, and several rewards weighted (TRL's reward_funcs)
reward_functions.py  reward functions: fastppo's and TRL's calling conventions, async, threads and signals
shaping.py      steps 2 and 4: from scores to per-token rewards (penalties, normalization, the KL penalty)
advantages.py   step 5: GAE and the critic-free estimators
groups.py       responses to one prompt, and DAPO's dynamic sampling
correction.py   the sampler-trainer log-prob gap and its correction (vLLM)
"""
