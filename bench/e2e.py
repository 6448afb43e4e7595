"""One PPO iteration end to end: fastppo against TRL 0.29.1's PPOTrainer on the same models and batch.

Each framework runs in a subprocess of its own (so peak RSS is its own), on the same random-init Llama-style policy,
reward model and prompts, with the same batch (16 prompts of 32 tokens, 64 response tokens, one PPO epoch, one
minibatch of 16 in two micro-batches). TRL keeps a separate value model, as it must; fastppo shares the backbone.
One warm-up iteration, then the mean over the timed ones. Tokens/s counts prompt + response tokens per iteration.

    python -m bench.e2e [--quick] [--out bench/results/e2e-....json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

DEFAULT = {"hidden": 256, "layers": 4, "vocab": 32000, "batch": 16, "micro_batch": 8, "prompt": 32, "response": 64,
           "iterations": 3}  # fmt: skip
QUICK = {"hidden": 32, "layers": 2, "vocab": 500, "batch": 4, "micro_batch": 2, "prompt": 8, "response": 8,
         "iterations": 1}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# the shared setup: models, tokenizer and prompts saved to a directory both frameworks load from
# ----------------------------------------------------------------------------------------------


def build_models(cfg: dict, directory: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(cfg["vocab"] - len(specials))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")  # fmt: skip
    config = LlamaConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["hidden"] * 8 // 3,
        num_hidden_layers=cfg["layers"], num_attention_heads=max(1, cfg["hidden"] // 64),
        max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory / "policy")
    config.num_labels = 1
    LlamaForSequenceClassification(config).save_pretrained(directory / "reward")
    for name in ("policy", "reward"):
        tokenizer.save_pretrained(directory / name)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(
        len(specials), cfg["vocab"], (cfg["batch"] * (cfg["iterations"] + 1), cfg["prompt"]), generator=g
    )
    prompts = [" ".join(f"w{i - len(specials)}" for i in row.tolist()) for row in ids]
    (directory / "prompts.json").write_text(json.dumps(prompts))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------
# the two contestants, each run as `python -m bench.e2e --run NAME --dir DIR`
# ----------------------------------------------------------------------------------------------


def run_trl(cfg: dict, directory: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(directory / "policy")
    prompts = json.loads((directory / "prompts.json").read_text())
    dataset = Dataset.from_dict({"input_ids": [tokenizer(p)["input_ids"] for p in prompts]})
    step_times = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_times.append(time.perf_counter())

    args = PPOConfig(
        output_dir=str(directory / "trl-out"), per_device_train_batch_size=cfg["micro_batch"],
        gradient_accumulation_steps=cfg["batch"] // cfg["micro_batch"], num_mini_batches=1, num_ppo_epochs=1,
        local_rollout_forward_batch_size=cfg["batch"], total_episodes=len(prompts), response_length=cfg["response"],
        stop_token="eos", temperature=1.0, kl_coef=0.05, learning_rate=1e-5, report_to="none", save_strategy="no",
        num_sample_generations=0, use_cpu=True, bf16=False, fp16=False, seed=0, logging_steps=1000,
    )  # fmt: skip
    trainer = PPOTrainer(
        args=args, processing_class=tokenizer,
        model=AutoModelForCausalLM.from_pretrained(directory / "policy"),
        ref_model=AutoModelForCausalLM.from_pretrained(directory / "policy"),
        reward_model=AutoModelForSequenceClassification.from_pretrained(directory / "reward"),
        value_model=AutoModelForSequenceClassification.from_pretrained(directory / "reward"),
        train_dataset=dataset, callbacks=[Timer()],
    )  # fmt: skip
    start = time.perf_counter()
    trainer.train()
    times = [start] + step_times
    per_iteration = [b - a for a, b in zip(times[1:-1], times[2:], strict=True)] or [times[-1] - times[0]]
    return {"seconds_per_iteration": sum(per_iteration) / len(per_iteration), "iterations": len(per_iteration)}


def run_fastppo(cfg: dict, directory: Path) -> dict:
    from fastppo import PPOConfig, PPOTrainer

    prompts = json.loads((directory / "prompts.json").read_text())
    config = PPOConfig(
        policy_model=str(directory / "policy"), reward_model=str(directory / "reward"),
        output_dir=str(directory / "fastppo-out"), steps=cfg["iterations"] + 1, rollout_batch_size=cfg["batch"],
        mini_batch_size=cfg["batch"], micro_batch_size=cfg["micro_batch"], ppo_epochs=1,
        max_prompt_length=cfg["prompt"], max_new_tokens=cfg["response"], kl_coef=0.05, learning_rate=1e-5,
        temperature=1.0, seed=0, save_every=0, device="cpu",
    )  # fmt: skip
    trainer = PPOTrainer(config, prompts=prompts)
    trainer.step()  # warm-up
    per_iteration, splits = [], []
    for _ in range(cfg["iterations"]):
        start = time.perf_counter()
        metrics = trainer.step()
        per_iteration.append(time.perf_counter() - start)
        phases = (k for k in metrics if k.startswith("perf/") and k.endswith("_s") and k != "perf/step_s")
        splits.append({k[5:-2]: metrics[k] for k in phases})
    total = {k: sum(s[k] for s in splits) for k in splits[0]} if splits and splits[0] else {}
    spent = sum(total.values()) or 1.0
    return {
        "seconds_per_iteration": sum(per_iteration) / len(per_iteration),
        "iterations": len(per_iteration),
        "time_split": {k: v / spent for k, v in total.items()},
    }


RUNNERS = {"trl 0.29.1 PPOTrainer": run_trl, "fastppo": run_fastppo}


def child(name: str, cfg: dict, directory: Path) -> None:
    result = RUNNERS[name](cfg, directory)
    tokens = cfg["batch"] * (cfg["prompt"] + cfg["response"])
    result.update(framework=name, tokens_per_s=tokens / result["seconds_per_iteration"], peak_memory_mb=peak_rss_mb())
    print("RESULT " + json.dumps(result))


def main(out: Path, quick: bool = False) -> dict:
    from bench.machine import machine_info

    cfg = QUICK if quick else DEFAULT
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        build_models(cfg, directory)
        for name in RUNNERS:
            print(f"e2e: {name} ...", flush=True)
            command = [sys.executable, "-m", "bench.e2e", "--child", name, "--dir", tmp] + (
                ["--quick"] if quick else []
            )
            proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ})
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                runs.append({"framework": name, "error": last[:200]})
                print(f"e2e: {name} failed: {last}", file=sys.stderr)
            else:
                runs.append(json.loads(lines[-1][len("RESULT ") :]))
    data = {"machine": machine_info(), "config": cfg, "runs": runs}
    split = next((r.get("time_split") for r in runs if r["framework"] == "fastppo" and "error" not in r), None)
    if split:
        data["fastppo_time_split"] = split
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2))
    return data


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", choices=list(RUNNERS))
    parser.add_argument("--dir")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / f"e2e-{int(time.time())}.json"))
    args = parser.parse_args()
    if args.child:
        child(args.child, QUICK if args.quick else DEFAULT, Path(args.dir))
    else:
        print(json.dumps(main(Path(args.out), args.quick), indent=2))
