"""Part 4 of bench/gpu_proof.py: PPO iterations of a Qwen2-0.5B-shaped random model on one GPU.

    python -m bench.gpu_ppo LINES [--dry-run]      # run by gpu_proof.py; each result is one JSON line in LINES

The policy has Qwen2-0.5B's shape (QWEN2_05B: 24 layers, hidden 896, 14 heads and 2 key/value heads, MLP 4864,
vocabulary 151,936, tied embeddings) with random weights in bf16, as a released checkpoint comes; the reward model is
a 1-label Qwen2 classifier of the same shape. Nothing is downloaded: the shape is what costs the time. fastppo trains
it with its hf rollout engine under bf16 autocast, the critic sharing the policy's backbone, on BATCH, in each of
MODES. Per mode, the first iteration (it compiles the kernels) is timed apart; the later ones give the median seconds
per iteration, tokens/s (the batch's prompt + response tokens over that), the phase split (the perf/<phase>_s
metrics PPOTrainer.step() returns) with its dominant phase, and the peak CUDA memory allocated. A mode's row is
written again after each iteration (its "key" says which row it replaces), so a run stopped early keeps the
iterations it finished. --dry-run: a tiny Qwen2 on this machine's device, two iterations; its times mean nothing.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.e2e import random_prompts, word_tokenizer
from bench.gpu_proof import attempt, child_arguments, emit

QWEN2_05B = {
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}
TINY = QWEN2_05B | {"vocab_size": 500, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
TINY |= {"num_attention_heads": 4, "max_position_embeddings": 512}
# 64 sequences of 128 prompt + 256 response tokens; two optimizer steps of 32, in micro-batches of 16.
BATCH = {"rollout_batch_size": 64, "mini_batch_size": 32, "micro_batch_size": 16, "prompt": 128, "response": 256}
BATCH["iterations"] = 4
DRY_BATCH = {"rollout_batch_size": 4, "mini_batch_size": 2, "micro_batch_size": 2, "prompt": 8, "response": 8}
DRY_BATCH["iterations"] = 2
MODES = {"full fine-tuning": {}, "LoRA rank 16": {"lora_rank": 16}}


def build_models(shape: dict, device: str):
    """(policy, reward model, tokenizer): random Qwen2 weights made on `device`, in bf16."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

    config = Qwen2Config(**shape, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):
        policy = Qwen2ForCausalLM(config).to(torch.bfloat16)
        config.num_labels = 1
        reward = Qwen2ForSequenceClassification(config).to(torch.bfloat16)
    return policy, reward, word_tokenizer(shape["vocab_size"])


def summary(mode: str, batch: dict, first_s: float, timed: list[tuple[float, dict]], trainer) -> dict:
    """One mode's row from its iterations after the first: medians of the time and of each phase."""
    seconds = statistics.median(s for s, _ in timed)
    # perf/<phase>_s for each phase PPOTrainer.step() timed (not the step's total, not the rates perf/..._per_s)
    phases = [k for k in timed[0][1] if k.startswith("perf/") and k.endswith("_s") and not k.endswith("_per_s")]
    phases = [k for k in phases if k != "perf/step_s"]
    phase_seconds = {k[len("perf/") : -len("_s")]: statistics.median(m[k] for _, m in timed) for k in phases}
    response = statistics.median(m["rollout/response_length_mean"] for _, m in timed)
    tokens = batch["rollout_batch_size"] * (batch["prompt"] + response)
    params = list(trainer.model.parameters())
    row = {"key": mode, "mode": mode, "first_iteration_s": first_s, "iterations_timed": len(timed)}
    row.update(seconds_per_iteration=seconds, tokens_per_iteration=tokens, tokens_per_s=tokens / seconds)
    row.update(phase_seconds=phase_seconds, dominant_phase=max(phase_seconds, key=phase_seconds.get))
    row["response_length_mean"] = response
    row["parameters_m"] = sum(p.numel() for p in params) / 1e6
    row["trainable_m"] = sum(p.numel() for p in params if p.requires_grad) / 1e6
    for name in ("perf/rollout_tokens_per_s", "perf/train_tokens_per_s", "perf/peak_memory_mb"):
        row[name[len("perf/") :]] = statistics.median(m[name] for _, m in timed)
    if torch.cuda.is_available():
        row["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def run_mode(lines, mode: str, options: dict, shape: dict, batch: dict, device: str, workdir: Path) -> None:
    from fastppo import PPOConfig, PPOTrainer

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    policy, reward, tokenizer = build_models(shape, device)
    config = PPOConfig(
        output_dir=str(workdir / mode.replace(" ", "-")),
        steps=batch["iterations"],
        rollout_batch_size=batch["rollout_batch_size"],
        mini_batch_size=batch["mini_batch_size"],
        micro_batch_size=batch["micro_batch_size"],
        ppo_epochs=1,
        max_prompt_length=batch["prompt"],
        max_new_tokens=batch["response"],
        rollout_engine="hf",
        precision="bf16",
        critic="shared",
        device=device,
        learning_rate=1e-6,
        kl_coef=0.05,
        seed=0,
        save_every=0,
        tensorboard=False,
        **options,
    )
    prompts = random_prompts(shape["vocab_size"], batch["rollout_batch_size"] * batch["iterations"], batch["prompt"])
    trainer = PPOTrainer(config, policy=policy, tokenizer=tokenizer, reward=reward, prompts=prompts)
    del policy, reward
    first_s, timed = None, []
    for i in range(batch["iterations"]):
        began = time.perf_counter()
        metrics = trainer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - began
        print(f"{mode}: iteration {i + 1} {seconds:.2f} s", flush=True)
        if first_s is None:
            first_s = seconds
            emit(lines, info={f"{mode}: first iteration s": seconds})
            continue
        timed.append((seconds, metrics))
        emit(lines, row=summary(mode, batch, first_s, timed, trainer))


def main() -> None:
    lines, dry_run, device = child_arguments(__doc__)
    shape, batch = (TINY, DRY_BATCH) if dry_run else (QWEN2_05B, BATCH)
    emit(lines, info={"device": device, "model": shape, "batch": batch})
    with tempfile.TemporaryDirectory() as tmp:
        for mode, options in MODES.items():
            attempt(lines, mode, lambda m=mode, o=options: run_mode(lines, m, o, shape, batch, device, Path(tmp)))


if __name__ == "__main__":
    main()
