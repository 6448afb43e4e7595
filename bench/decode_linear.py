"""The decode's linear layers, each way `DecodeLinear` can multiply them, on this CPU.

A decode step multiplies a few rows by every weight of the model: q/k/v (stacked), o, gate/up (stacked), down and
the LM head. `fastppo.engines.lean_decode.prepacking` picks the library that packs the weights once a rollout: MKL
on Intel CPUs and for small products, oneDNN on others, oneDNN for bf16. This times every choice at a bench size's
shapes and the decode's row count, so the choice can be checked on any CPU (the result names it).

    python -m bench.decode_linear [--size smollm2|varlen|default|large]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of each decode product at a bench size (bench.e2e's models: Llama, SwiGLU)."""
    H = cfg["hidden"]
    head_dim = H // cfg.get("heads", max(1, H // 64))
    kv = head_dim * cfg.get("kv_heads", cfg.get("heads", max(1, H // 64)))
    intermediate = cfg.get("intermediate", H * 8 // 3)
    return {
        "qkv": (H + 2 * kv, H),
        "o": (H, H),
        "gate_up": (2 * intermediate, H),
        "down": (H, intermediate),
        "lm_head": (cfg["vocab"], H),
    }


def main(size: str) -> dict:
    import torch

    from bench.e2e import SIZES, best_seconds
    from bench.machine import machine_info
    from fastppo.engines import lean_decode

    cfg, rows = SIZES[size], SIZES[size]["batch"]
    available = {
        "mkl": lean_decode._mkl_prepacking(),
        "onednn": lean_decode._onednn_prepacking(),
        "none": True,
    }
    original = lean_decode.prepacking
    results = []
    try:
        for name, (out_features, in_features) in shapes(cfg).items():
            g = torch.Generator().manual_seed(0)
            weight = torch.randn(out_features, in_features, generator=g)
            x = torch.randn(rows, in_features, generator=g)
            for dtype in (torch.float32, torch.bfloat16):
                chosen = original(dtype, rows * out_features * in_features)
                for packing, ok in available.items():
                    if not ok or (packing == "mkl" and dtype != torch.float32):
                        continue
                    lean_decode.prepacking = lambda dtype, multiply_adds, packing=packing: packing
                    linear = lean_decode.DecodeLinear(weight, None, rows, dtype)
                    seconds = best_seconds(lambda linear=linear, x=x: linear(x), tries=15)
                    results.append(
                        {
                            "product": name,
                            "shape": f"{rows}x{in_features} @ {in_features}x{out_features}",
                            "dtype": str(dtype).removeprefix("torch."),
                            "packing": packing,
                            "ms": seconds * 1e3,
                            "chosen": packing == chosen,
                        }
                    )
    finally:
        lean_decode.prepacking = original
    for row in results:
        mark = "  <- chosen" if row["chosen"] else ""
        print(f"{row['product']:8} {row['shape']:24} {row['dtype']:9} {row['packing']:7} {row['ms']:8.3f} ms{mark}")
    return {"machine": machine_info(), "size": size, "rows": rows, "results": results}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="smollm2")
    args = parser.parse_args()
    data = main(args.size)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out = ROOT / "bench" / "results" / f"decode-linear-{args.size}-{stamp}.json"
    out.write_text(json.dumps(data, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")
