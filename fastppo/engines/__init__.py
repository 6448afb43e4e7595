"""Rollout engines: how responses are sampled from the policy.

    hf.py           fastppo's own decode loop over the model's KV cache (the reference engine)
    lean_decode.py  its CPU fast path for Llama-family decoders
    vllm.py         an in-process vLLM engine per rank, its weights synced from the trainer

Engines know models and tokens, never PPO: they return tensors, and the PPO loop builds its batch from them.
"""
