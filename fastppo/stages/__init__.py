"""The training stages around PPO, each a command: `sft` (supervised fine-tuning), `reward-model` (a Bradley-Terry
reward model) and `dpo` (Direct Preference Optimization). `common.py` holds what they share. Stages never import
the PPO loop."""
