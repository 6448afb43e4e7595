"""What every training stage runs on: typed configs, input validation, checkpoints, processes, precision, random
number generators, the learning-rate schedule, signals and metrics. Nothing here knows PPO or any stage; it imports
only `fastppo.ops` and itself."""
