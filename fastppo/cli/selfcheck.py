"""`fastppo selfcheck`: check every op against its float64 reference on this machine, then time it.

For each op and each backend that can run here, the op runs on fresh random inputs and its outputs (and gradients,
where the op has them) are compared with `fastppo.ops.reference` computed in float64. Then the backend `auto`
picks is timed against the unfused PyTorch code RLHF trainers run today, in the same process, and the table shows
the ratio. It is a quick smoke check for a new install; the full suites are `pytest tests/` and, from a checkout,
`python -m bench`.
"""

from __future__ import annotations

import os
import time

import torch

from fastppo import ops
from fastppo.ops import dispatch, reference


def _inputs(device: str, seed: int = 0, B: int = 16, T: int = 128, V: int = 1000, H: int = 64):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device)

    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T) < lengths[:, None]).long().to(device)
    return {
        "logits": randn(B, T, V) * 3,
        "tokens": torch.randint(0, V, (B, T), generator=g).to(device),
        "hidden": randn(B, T, H),
        "weight": randn(V, H) / H**0.5,
        "logprobs": -randn(B, T).abs(),
        "ref_logprobs": -randn(B, T).abs(),
        "advantages": randn(B, T),
        "values": randn(B, T),
        "returns": randn(B, T),
        "scores": randn(B),
        "uniform": torch.rand(B, generator=g).to(device),
        "mask": mask,
        "lam": torch.rand(B, generator=g).to(device),
        "old_logprobs": -randn(B, T).abs(),
    }


def _cases(x):
    """op name -> (call(module) -> tensor outputs, differentiable input names)."""
    return {
        "token_logprobs_and_entropy": (
            lambda m: m.token_logprobs_and_entropy(x["logits"], x["tokens"], 0.9),
            ["logits"],
        ),
        "linear_token_logprobs": (
            lambda m: m.linear_token_logprobs(x["hidden"], x["weight"], x["tokens"], 1.0, None, True),
            ["hidden", "weight"],
        ),
        # The same uniform numbers draw the same tokens: the error is 0 unless a token differs.
        "sample_tokens": (lambda m: m.sample_tokens(x["logits"][:, 0].contiguous(), x["uniform"], 0.9), []),
        "kl_penalty": (lambda m: m.kl_penalty(x["logprobs"], x["ref_logprobs"], "k3"), ["logprobs"]),
        "shape_rewards": (
            lambda m: m.shape_rewards(x["scores"], x["logprobs"], x["ref_logprobs"], x["mask"], 0.05, "k1"),
            [],
        ),
        # One lambda per row and decoupled returns: the op's whole scan.
        "gae": (lambda m: m.gae(x["advantages"], x["values"], x["mask"], 1.0, x["lam"], 1.0), []),
        "length_adaptive_lam": (lambda m: m.length_adaptive_lam(x["mask"], 0.05), []),
        "group_advantages": (lambda m: m.group_advantages(x["scores"], 4, "grpo", 1e-6), []),
        "masked_whiten": (lambda m: m.masked_whiten(x["advantages"], x["mask"], True, 1e-8), []),
        "ppo_policy_loss": (
            lambda m: m.ppo_policy_loss(
                x["logprobs"],
                x["old_logprobs"],
                x["advantages"],
                x["mask"],
                0.2,
                None,
                None,
                "token-mean",
                None,
                x["ref_logprobs"],
                0.1,
                "k3",
            )[0],
            ["logprobs"],
        ),
        "ppo_value_loss": (
            lambda m: m.ppo_value_loss(x["values"], x["returns"], x["advantages"], x["mask"], 0.2, "token-mean", None)[
                0
            ],
            ["values"],
        ),
    }


def _outputs_and_grads(call, module, x, grad_names):
    for name in grad_names:
        x[name] = x[name].detach().requires_grad_(True)
    out = call(module)
    outs = list(out) if isinstance(out, tuple) else [out]
    grads = []
    if grad_names:
        total = sum((o.float() * (i + 1)).sum() for i, o in enumerate(outs) if o.isfinite().all())
        grads = list(torch.autograd.grad(total, [x[n] for n in grad_names]))
    return [o.detach() for o in outs] + grads


def check(device: str = "cpu") -> list[tuple[str, str, float]]:
    """(op, backend, max abs error vs the float64 reference) for every op and every backend available here."""
    rows = []
    x = _inputs(device)
    x64 = {k: (v.double() if v.is_floating_point() else v) for k, v in x.items()}
    for op, (call, grad_names) in _cases(x).items():
        expected = _outputs_and_grads(_cases(x64)[op][0], reference, x64, grad_names)
        for backend in dispatch.BACKENDS:
            if dispatch.unavailable_reason(backend, op, device) is not None:
                continue
            with ops.use_backend(backend):
                got = _outputs_and_grads(call, ops, x, grad_names)
            error = max(float((a.double() - b).abs().max()) for a, b in zip(got, expected, strict=True))
            rows.append((op, backend, error))
    return rows


def _time(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def python_loop_gae(rewards, values, response_mask, gamma=1.0, lam=0.95):
    """GAE as TRL / OpenRLHF / veRL compute it: a Python iteration per time step (the baseline here and in bench/)."""
    T = rewards.shape[1]
    values = values * response_mask
    rewards = rewards * response_mask
    last_advantage = 0
    advantages_reversed = []
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_advantage = delta + gamma * lam * last_advantage
        advantages_reversed.append(last_advantage)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages * response_mask, (advantages + values) * response_mask


def benchmark(device: str = "cpu") -> list[tuple[str, str, float, float]]:
    """(op, backend auto picks, baseline seconds, fastppo seconds) at small sizes."""
    x = _inputs(device, B=64, T=256, V=4000)
    logits, tokens = x["logits"], x["tokens"]
    pairs = {
        "token_logprobs": (
            lambda: torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1),
            lambda: ops.token_logprobs(logits, tokens),
        ),
        "gae": (
            lambda: python_loop_gae(x["advantages"], x["values"], x["mask"]),
            lambda: ops.gae(x["advantages"], x["values"], x["mask"], 1.0, 0.95),
        ),
        "ppo_policy_loss": (
            lambda: reference.ppo_policy_loss(x["logprobs"], x["ref_logprobs"], x["advantages"], x["mask"]),
            lambda: ops.ppo_policy_loss(x["logprobs"], x["ref_logprobs"], x["advantages"], x["mask"]),
        ),
    }
    return [(op, dispatch.select(op, device), _time(base), _time(fast)) for op, (base, fast) in pairs.items()]


def add_arguments(parser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def run(args) -> int:
    device = args.device
    if device == "cpu":
        # Check the Triton kernels too, in Triton's interpreter (set before any kernel module is imported).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    print(f"fastppo selfcheck on {device}: every op and backend against the float64 reference")
    print(f"{'op':28s} {'backend':8s} {'max abs error':>14s}")
    worst = 0.0
    for op, backend, error in check(device):
        worst = max(worst, error)
        print(f"{op:28s} {backend:8s} {error:14.2e}")
    print(f"\nspeed against unfused PyTorch on {device} (same process, best of 5):")
    print(f"{'op':28s} {'backend':8s} {'baseline ms':>12s} {'fastppo ms':>11s} {'speed-up':>9s}")
    for op, backend, base, fast in benchmark(device):
        print(f"{op:28s} {backend:8s} {base * 1e3:12.2f} {fast * 1e3:11.2f} {base / fast:8.1f}x")
    ok = worst < 1e-3
    print("\nselfcheck passed" if ok else f"\nselfcheck FAILED: worst error {worst:.2e}")
    return 0 if ok else 1
