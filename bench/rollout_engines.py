"""Rollout tokens/s of the two engines side by side: fastppo's decode loop (`rollout_engine: hf`) and vLLM.

Both sample the same prompts from the same random-init Llama (the e2e bench's model, and a larger one) at
temperature 1, stopping only at the tokenizer's EOS (rare in a random 32000-word model: rows run to max_new_tokens),
in one process of the vLLM environment (.venv-vllm); tokens/s counts the generated tokens. One warm-up rollout,
then the median of the timed ones. Both engines return the sampled tokens' log-probs, as the trainer asks of them. The
vLLM row also times one weight sync (the policy's weights pushed in-process).

    .venv-vllm/bin/python -m bench.rollout_engines [--quick] [--model e2e] [--out bench/results/rollout-....json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.e2e import DEFAULT, build_models

MODELS = {
    "e2e": DEFAULT,  # hidden 256, 4 layers, vocab 32000: 16 prompts of 32 tokens, 64 new tokens
    "larger": {**DEFAULT, "hidden": 768, "layers": 12, "response": 256},
}
QUICK = {"e2e": {**DEFAULT, "response": 16}}


def time_rollouts(fn, repeats: int) -> tuple[float, int]:
    """(median seconds, response tokens of a rollout); `fn` returns generate's tuple (mask second)."""
    fn()  # warm-up
    times, tokens = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
        tokens = int(out[1].sum())
    return statistics.median(times), tokens


def bench_model(name: str, cfg: dict, repeats: int) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastppo.data import tokenize_prompts
    from fastppo.engines.hf import generate
    from fastppo.engines.vllm import VLLMEngine, policy_weights

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        build_models(cfg, directory)
        path = str(directory / "policy")
        tokenizer = AutoTokenizer.from_pretrained(path)
        prompts = json.loads((directory / "prompts.json").read_text())[: cfg["batch"]]
        ids, mask = tokenize_prompts(prompts, tokenizer, cfg["prompt"])
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        hf_s, hf_tokens = time_rollouts(
            lambda: generate(lm, tokenizer, ids, mask, cfg["response"], 1.0, end_ids=[], with_logprobs=True), repeats
        )
        engine = VLLMEngine(path, None, torch.device("cpu"), seed=0, max_model_len=cfg["prompt"] + cfg["response"] + 8)
        vllm_s, vllm_tokens = time_rollouts(
            lambda: engine.generate(ids, mask, cfg["response"], 1.0, end_ids=[]), repeats
        )
        sync_s = engine.sync_weights(policy_weights(lm))
    shape = {k: cfg[k] for k in ("hidden", "layers", "vocab", "batch", "prompt", "response")}
    return [
        {"model": name, **shape, "engine": "hf", "rollout_s": hf_s, "tokens_per_s": hf_tokens / hf_s},
        {
            "model": name,
            **shape,
            "engine": "vllm",
            "rollout_s": vllm_s,
            "tokens_per_s": vllm_tokens / vllm_s,
            "startup_s": engine.startup_s,
            "sync_s": sync_s,
        },
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", choices=sorted(MODELS), action="append", help="only these (default: all)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    chosen = QUICK if args.quick else {k: v for k, v in MODELS.items() if not args.model or k in args.model}
    for name, cfg in chosen.items():
        rows += bench_model(name, cfg, repeats=1 if args.quick else 3)
        for row in rows[-2:]:
            print(json.dumps(row))
    import vllm

    from bench.machine import machine_info

    result = {"machine": machine_info(), "threads": torch.get_num_threads(), "vllm": vllm.__version__, "rows": rows}
    out = Path(args.out or f"bench/results/rollout-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
