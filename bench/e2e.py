"""PPO end to end: fastppo against TRL 0.29.1's PPOTrainer on the same models and batch.

Each framework runs in a subprocess of its own (so peak RSS is its own), on the same random-init Llama-style policy,
reward model and prompts (saved in bf16, as released checkpoints are; both frameworks compute in float32 on a CPU:
TRL loads every model as float32, fastppo trains a float32 copy of the policy and reads the frozen models' bf16
matrices as float32, the same numbers at half their memory), with the same batch (16 prompts, one PPO epoch, one
minibatch of 16 in two micro-batches; 32 prompt + 64 response tokens at the default size, 64 + 256 at `large`, 32 + up
to 256 at `varlen`, whose answers end at EOS at lengths of their own). TRL
keeps a separate value model, as it must; fastppo shares the backbone. Each framework's whole `train()` of
`iterations` iterations is timed, the first included (no warm-up is left out); s / iteration is that time over the
iterations. The frameworks take turns for `repeats` rounds (3 at the default size) and each one's median try is
reported, with every try's numbers beside it: this 2-core VM's speed drifts by 10-20% from minute to minute.
Tokens/s counts prompt + response tokens. fastppo's phases are then set against what the machine does
(`hardware_ratios`): the FLOP/s of each phase against a matmul of the LM head's shape, and the decode's weight reads
against a memory copy.

    python -m bench.e2e [--size default|large|quick|varlen|smollm2] [--out bench/results/e2e-....json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

DEFAULT = {
    "hidden": 256,
    "layers": 4,
    "vocab": 32000,
    "batch": 16,
    "micro_batch": 8,
    "prompt": 32,
    "response": 64,
    "iterations": 4,
    "repeats": 3,
}
LARGE = {
    "hidden": 768,
    "layers": 12,
    "vocab": 32000,
    "batch": 16,
    "micro_batch": 8,
    "prompt": 64,
    "response": 256,
    "iterations": 2,
    "repeats": 1,
}
QUICK = {
    "hidden": 32,
    "layers": 2,
    "vocab": 500,
    "batch": 4,
    "micro_batch": 2,
    "prompt": 8,
    "response": 8,
    "iterations": 2,
    "repeats": 1,
}
# Answers of their own lengths: a random policy over 64 tokens ends an answer at EOS after about 64 tokens (one chance
# in 64 a step), so most rows of a batch are far shorter than its longest; what padding and finished rows cost shows.
VARLEN = {
    "hidden": 512,
    "layers": 8,
    "vocab": 64,
    "batch": 16,
    "micro_batch": 8,
    "prompt": 32,
    "response": 256,
    "iterations": 2,
    "repeats": 1,
}
# A released model's shape and its real answers: SmolLM2-135M-Instruct (grouped-query attention, tied embeddings,
# vocabulary 49,152) from the `smollm2` extra, on arithmetic problems rendered with its chat template. Its answers end
# at <|im_end|> at lengths of their own, so a batch is mostly shorter than `response`. The reward model is the same
# checkpoint with a new 1-label head (its scores are noise; the cost is what is measured).
SMOLLM2 = {
    "model": "smollm2-135m-instruct",
    "hidden": 576,
    "layers": 30,
    "heads": 9,
    "kv_heads": 3,
    "intermediate": 1536,
    "vocab": 49152,
    "batch": 16,
    "micro_batch": 8,
    "prompt": 0,  # set by build_models: every prompt has the same length (TRL pads the dataset's rows on the right)
    "response": 64,
    "iterations": 2,
    "repeats": 1,
}
SIZES = {"default": DEFAULT, "large": LARGE, "quick": QUICK, "varlen": VARLEN, "smollm2": SMOLLM2}


# ----------------------------------------------------------------------------------------------
# the shared setup: models, tokenizer and prompts saved to a directory both frameworks load from
# ----------------------------------------------------------------------------------------------


SPECIALS = ["<pad>", "<eos>", "<unk>"]  # ids 0, 1, 2; word wI is token I + 3


def word_tokenizer(vocab_size: int):
    """A tokenizer built offline: the specials, then one token per word w0, w1, ... (prompts are such words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + [f"w{i}" for i in range(vocab_size - len(SPECIALS))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def random_prompts(vocab_size: int, count: int, length: int) -> list[str]:
    """`count` prompts of `length` random words (one token each), seeded."""
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(len(SPECIALS), vocab_size, (count, length), generator=g)
    return [" ".join(f"w{i - len(SPECIALS)}" for i in row.tolist()) for row in ids]


def build_models(cfg: dict, directory: Path) -> None:
    if "model" in cfg:
        return build_released(cfg, directory)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tokenizer = word_tokenizer(cfg["vocab"])
    config = LlamaConfig(
        vocab_size=cfg["vocab"],
        hidden_size=cfg["hidden"],
        intermediate_size=cfg["hidden"] * 8 // 3,
        num_hidden_layers=cfg["layers"],
        num_attention_heads=max(1, cfg["hidden"] // 64),
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)  # saved in bf16, as released checkpoints are
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory / "policy")
    config.num_labels = 1
    LlamaForSequenceClassification(config).to(torch.bfloat16).save_pretrained(directory / "reward")
    for name in ("policy", "reward"):
        tokenizer.save_pretrained(directory / name)
    prompts = random_prompts(cfg["vocab"], cfg["batch"] * cfg["iterations"], cfg["prompt"])
    (directory / "prompts.json").write_text(json.dumps(prompts))


def build_released(cfg: dict, directory: Path) -> None:
    """The released model as the policy, the same checkpoint with a seeded new score head as the reward model, and
    chat-rendered problems of one token length (the most common one) as prompts; the length goes to cfg.json."""
    import collections

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fastppo.demo import arithmetic
    from fastppo.runtime.model_sources import resolve

    source = Path(resolve(cfg["model"], "--size smollm2"))
    (directory / "policy").symlink_to(source, target_is_directory=True)
    tokenizer = AutoTokenizer.from_pretrained(source)
    torch.manual_seed(0)
    reward = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, dtype=torch.bfloat16)
    reward.config.pad_token_id = tokenizer.pad_token_id
    reward.save_pretrained(directory / "reward")
    tokenizer.save_pretrained(directory / "reward")
    train, _ = arithmetic.split(0)
    chats = [[{"role": "user", "content": row["prompt"]}] for row in train]
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    length = collections.Counter(lengths).most_common(1)[0][0]
    prompts = [t for t, n in zip(texts, lengths, strict=True) if n == length][: cfg["batch"] * cfg["iterations"]]
    (directory / "prompts.json").write_text(json.dumps(prompts))
    (directory / "cfg.json").write_text(json.dumps({"prompt": length}))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------
# the two contestants, each run as `python -m bench.e2e --run NAME --dir DIR`
# ----------------------------------------------------------------------------------------------


def run_trl(cfg: dict, directory: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(directory / "policy")
    prompts = json.loads((directory / "prompts.json").read_text())
    special = "model" not in cfg  # a chat-rendered prompt has its special tokens already
    dataset = Dataset.from_dict({"input_ids": [tokenizer(p, add_special_tokens=special)["input_ids"] for p in prompts]})
    args = PPOConfig(
        output_dir=str(directory / "runs" / "trl"),
        per_device_train_batch_size=cfg["micro_batch"],
        gradient_accumulation_steps=cfg["batch"] // cfg["micro_batch"],
        num_mini_batches=1,
        num_ppo_epochs=1,
        local_rollout_forward_batch_size=cfg["batch"],
        total_episodes=len(prompts),
        response_length=cfg["response"],
        stop_token="eos",
        temperature=1.0,
        kl_coef=0.05,
        learning_rate=1e-5,
        report_to="none",
        save_strategy="no",
        num_sample_generations=0,
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=0,
        logging_steps=1000,
    )
    fp32 = {"dtype": torch.float32}  # TRL computes in each model's dtype: float32 on a CPU, as fastppo does
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=AutoModelForCausalLM.from_pretrained(directory / "policy", **fp32),
        ref_model=AutoModelForCausalLM.from_pretrained(directory / "policy", **fp32),
        reward_model=AutoModelForSequenceClassification.from_pretrained(directory / "reward", **fp32),
        value_model=AutoModelForSequenceClassification.from_pretrained(directory / "reward", **fp32),
        train_dataset=dataset,
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    iterations = trainer.state.global_step
    return {"seconds_per_iteration": seconds / iterations, "iterations": iterations}


def fastppo_trainer(cfg: dict, directory: Path, **options):
    """fastppo's PPOTrainer on the shared setup in `directory`, with the bench's batch and settings."""
    from fastppo import PPOConfig, PPOTrainer

    prompts = json.loads((directory / "prompts.json").read_text())
    config = PPOConfig(
        policy_model=str(directory / "policy"),
        reward_model=str(directory / "reward"),
        output_dir=str(directory / "runs" / "-".join(["fastppo", *options])),
        steps=cfg["iterations"],
        rollout_batch_size=cfg["batch"],
        mini_batch_size=cfg["batch"],
        micro_batch_size=cfg["micro_batch"],
        ppo_epochs=1,
        max_prompt_length=cfg["prompt"],
        max_new_tokens=cfg["response"],
        kl_coef=0.05,
        learning_rate=1e-5,
        temperature=1.0,
        seed=0,
        save_every=0,
        device="cpu",
        report_to=[],
        **options,
    )
    trainer = PPOTrainer(config, prompts=prompts)
    trainer.save = lambda *args, **kwargs: None  # the final checkpoint is not part of an iteration (TRL saves none)
    return trainer


def run_fastppo(cfg: dict, directory: Path, **options) -> dict:
    trainer = fastppo_trainer(cfg, directory, **options)
    start = time.perf_counter()
    history = trainer.train()
    seconds = time.perf_counter() - start
    phases = ("rollout", "reward", "logprobs", "advantages", "train")
    phase_s = {p: sum(m.get(f"perf/{p}_s", 0.0) for m in history) / len(history) for p in phases}
    return {
        "seconds_per_iteration": seconds / len(history),
        "iterations": len(history),
        "phase_seconds": phase_s,
        "response_tokens": sum(float(m["rollout/response_length_mean"]) for m in history) / len(history),
        # real tokens over computed ones in each phase after the rollout (1.0: no padding paid for)
        "real_token_fraction": {
            phase: sum(m[f"perf/{phase}_real_frac"] for m in history) / len(history)
            for phase in ("rollout", "reward", "logprobs", "train")
            if f"perf/{phase}_real_frac" in history[0]
        },
        "old_logprobs_from_rollout": trainer.old_logprobs_from_rollout,
        "precision": "float32" if trainer.autocast_dtype is None else "bf16",  # what `precision` resolved to
    }


# ----------------------------------------------------------------------------------------------
# the distance to the hardware: each phase's arithmetic or memory traffic against what this machine does
# ----------------------------------------------------------------------------------------------


def best_seconds(fn, tries: int = 7) -> float:
    fn()
    times = []
    for _ in range(tries):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def hardware_ratios(cfg: dict, phase_s: dict, response_tokens: float, recomputed: bool) -> dict:
    """FLOP/s of each phase over the FLOP/s of one (micro-batch response tokens x H) @ (H x V) matmul (the LM head,
    the largest GEMM of the iteration), and the decode's weight bytes/s over a copy of as many bytes. Forward FLOPs
    are 2 x parameters x tokens (the LM head over the response tokens only, as fastppo computes it), training 3x a
    forward plus the LM head recomputed in the backward; attention's own FLOPs are left out (short contexts)."""
    import torch

    H, L, V, B = cfg["hidden"], cfg["layers"], cfg["vocab"], cfg["batch"]
    kv = H * cfg.get("kv_heads", 1) // cfg.get("heads", 1)  # grouped-query attention's key/value width
    body = L * (2 * H * H + 2 * H * kv + 3 * H * cfg.get("intermediate", H * 8 // 3))  # attention + SwiGLU MLP
    tokens = B * (cfg["prompt"] + response_tokens)
    head_tokens = B * response_tokens
    forward = 2 * body * tokens + 2 * H * V * head_tokens  # one policy-shaped forward
    reward = 2 * body * tokens  # a 1-label head
    flops = {
        "rollout": forward,  # prefill + decode: the same tokens, one at a time
        "reward": reward,
        "logprobs": forward * (2 if recomputed else 1),  # the reference (+ the policy when recomputed)
        "train": 3 * forward + 2 * H * V * head_tokens,
    }
    rows = cfg["micro_batch"] * cfg["response"]
    a, w = torch.randn(rows, H), torch.randn(V, H)
    weight_bytes = 4 * (body + H * V)
    src = torch.randn(weight_bytes // 4)
    dst = torch.empty_like(src)
    # The machine's rates are the best of several tries: a shared machine only ever makes a try slower.
    matmul_flops = 2 * rows * H * V / best_seconds(lambda: torch.nn.functional.linear(a, w))
    copy_bytes_per_s = weight_bytes / best_seconds(lambda: dst.copy_(src))
    decode_bytes_per_s = weight_bytes * response_tokens / max(phase_s["rollout"], 1e-9)
    out = {"matmul_gflops": matmul_flops / 1e9, "copy_gb_per_s": copy_bytes_per_s / 1e9}
    for phase, f in flops.items():
        achieved = f / max(phase_s[phase], 1e-9)
        out[f"{phase}_gflops"] = achieved / 1e9
        out[f"{phase}_of_matmul"] = achieved / matmul_flops
    out["decode_gb_per_s"] = decode_bytes_per_s / 1e9
    out["decode_of_copy"] = decode_bytes_per_s / copy_bytes_per_s
    # The iteration at these rates: the scoring and training FLOPs and the prefill's at the matmul's rate, one read
    # of the weights per decode step at the copy's. No float32 implementation on this machine goes below it.
    prefill = 2 * body * B * cfg["prompt"]
    compute = prefill + sum(f for phase, f in flops.items() if phase != "rollout")
    out["floor_seconds"] = compute / matmul_flops + weight_bytes * response_tokens / copy_bytes_per_s
    return out


RUNNERS = {
    "trl 0.29.1 PPOTrainer": run_trl,
    # precision auto: bf16 where the CPU multiplies it and the start-up probe measured it faster
    "fastppo": run_fastppo,
    # the same run recomputing each layer's activations in the backward: memory traded for a forward's time
    "fastppo, gradient_checkpointing": lambda cfg, directory: run_fastppo(cfg, directory, gradient_checkpointing=True),
    # each precision whatever auto picks: bf16 (autocast, the decode from bf16 weights) is faster only on CPUs with
    # AMX / AVX-512 BF16 (`fastppo doctor`); elsewhere it measures what emulated bf16 costs
    "fastppo, precision float32": lambda cfg, directory: run_fastppo(cfg, directory, precision="float32"),
    "fastppo, precision bf16": lambda cfg, directory: run_fastppo(cfg, directory, precision="bf16"),
}


def child(name: str, cfg: dict, directory: Path) -> None:
    if (directory / "cfg.json").is_file():  # what build_models measured (the released model's prompt length)
        cfg = cfg | json.loads((directory / "cfg.json").read_text())
    result = RUNNERS[name](cfg, directory)
    tokens = cfg["batch"] * (cfg["prompt"] + cfg["response"])
    result.update(framework=name, tokens_per_s=tokens / result["seconds_per_iteration"], peak_memory_mb=peak_rss_mb())
    if "phase_seconds" in result:  # measured after the peak RSS: its tensors are not the framework's
        result["hardware"] = hardware_ratios(
            cfg, result["phase_seconds"], result["response_tokens"], not result["old_logprobs_from_rollout"]
        )
    print("RESULT " + json.dumps(result))


def median_run(tries: list[dict]) -> dict:
    """The try of median time (its phases and peak memory with it), with every try's time and memory listed."""
    ok = sorted((t for t in tries if "error" not in t), key=lambda t: t["seconds_per_iteration"])
    if not ok:
        return tries[-1]
    run = dict(ok[(len(ok) - 1) // 2])
    run["seconds_per_iteration_tries"] = [t["seconds_per_iteration"] for t in tries if "error" not in t]
    run["peak_memory_mb_tries"] = [t["peak_memory_mb"] for t in tries if "error" not in t]
    return run


def main(out: Path, size: str = "default") -> dict:
    from bench.machine import machine_info

    cfg = SIZES[size]
    tries: dict[str, list[dict]] = {name: [] for name in RUNNERS}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        build_models(cfg, directory)
        # The frameworks take turns, `repeats` rounds: a shared machine's slow spells then fall on each of them.
        for round_ in range(cfg["repeats"]):
            for name in RUNNERS:
                print(f"e2e: {name} ({round_ + 1}/{cfg['repeats']}) ...", flush=True)
                shutil.rmtree(directory / "runs", ignore_errors=True)
                command = [sys.executable, "-m", "bench.e2e", "--child", name, "--dir", tmp, "--size", size]
                proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ})
                lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                if proc.returncode != 0 or not lines:
                    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                    tries[name].append({"framework": name, "error": last[:200]})
                    print(f"e2e: {name} failed: {last}", file=sys.stderr)
                else:
                    tries[name].append(json.loads(lines[-1][len("RESULT ") :]))
        if (directory / "cfg.json").is_file():
            cfg = cfg | json.loads((directory / "cfg.json").read_text())
    data = {"machine": machine_info(), "size": size, "config": cfg, "runs": [median_run(t) for t in tries.values()]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2))
    return data


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=list(SIZES), default="default")
    parser.add_argument("--child", choices=list(RUNNERS))
    parser.add_argument("--dir")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        child(args.child, SIZES[args.size], Path(args.dir))
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        out = args.out or ROOT / "bench" / "results" / f"e2e-{args.size}-{stamp}.json"
        print(json.dumps(main(Path(out), args.size), indent=2))
