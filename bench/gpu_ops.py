"""Part 3 of bench/gpu_proof.py: the ops at the anchors' shapes against their unfused torch forms, on one GPU.

    python -m bench.gpu_ops LINES [--dry-run]      # run by gpu_proof.py; each result is one JSON line in LINES

- copy: a device-to-device copy of 2 GiB; its bandwidth counts the bytes read and the bytes written. The memory-bound
  ops are set against it, measured in the same process a moment before them.
- token_logprobs forward, N = 8192, V = 151936, bf16 (TRL #7244's shape): fastppo's Triton kernel, log_softmax +
  gather, and TRL's selective_log_softmax where trl is installed. GB/s counts the logits read once.
- linear_token_logprobs with entropy, forward + backward, M = 8192, H = 4096, V = 131072, bf16 (Liger's shape): fused
  against the logits materialized (a float32 log-softmax, veRL's torch path). "working" memory is the peak beyond
  the inputs and their gradients, which both must hold; it is set against the logits' bf16 bytes.
- gae, shape_rewards, and policy + value loss forward + backward, at B = 64 and 512, T = 1024 and 8192: fastppo
  against the Python time loop (GAE) and unfused torch.

Times are CUDA-event medians after warm-up calls (which compile the kernels). Every benchmark is attempted on its
own: one that fails is an error line, and the next one runs. --dry-run: the same calls at tiny sizes on this
machine's device (on a CPU the Triton kernels run in Triton's interpreter); its times mean nothing.
"""

from __future__ import annotations

import statistics
import time

import torch

from bench import baselines
from bench.gpu_proof import LINEAR_GROUP, LINEAR_SHAPE, LOGPROBS_GROUP, LOGPROBS_SHAPE, attempt, child_arguments, emit
from fastppo import ops
from fastppo.ops import dispatch

FULL = {
    "copy_bytes": 2 << 30,
    "logprobs": LOGPROBS_SHAPE,
    "linear": LINEAR_SHAPE,
    "sequences": [(64, 1024), (64, 8192), (512, 1024), (512, 8192)],
    "reps": 20,
    "loop_reps": 3,
    "warmup": 2,
}
DRY = {"copy_bytes": 1 << 20, "logprobs": (16, 100), "linear": (16, 8, 64), "sequences": [(2, 16)], "reps": 1}
DRY.update(loop_reps=1, warmup=0)
DTYPE = torch.bfloat16  # the groups' names (gpu_proof.LOGPROBS_GROUP, LINEAR_GROUP) say bf16


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device: str, reps: int, warmup: int) -> float:
    """The median of `reps` calls after `warmup` ones, by CUDA events on a GPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def peak_extra_mib(fn, device: str) -> float | None:
    """Memory one call holds at its peak beyond what was allocated before it (None off a GPU)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def fastppo(fn, backend: str):
    def call(*args, **kwargs):
        with ops.use_backend(backend):
            return fn(*args, **kwargs)

    return call


def measure_copy(lines, device: str, size: dict) -> float:
    src = torch.empty(size["copy_bytes"], dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, size["reps"], size["warmup"])
    gb_per_s = 2 * src.numel() / ms / 1e6  # read + write
    emit(lines, info={"copy_gb_per_s": gb_per_s, "copy_bytes": src.numel()})
    print(f"copy: {gb_per_s:.0f} GB/s", flush=True)
    return gb_per_s


def token_logprobs(lines, device: str, size: dict, backend: str, copy_gb_per_s: float | None) -> None:
    N, V = size["logprobs"]
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(N, V, generator=g) * 2).to(DTYPE).to(device)
    tokens = torch.randint(0, V, (N,), generator=g).to(device)
    impls = {
        f"fastppo[{backend}]": fastppo(ops.token_logprobs, backend),
        "log_softmax+gather": baselines.log_softmax_gather,
    }
    trl_fn, _ = baselines.trl_selective_log_softmax()
    if trl_fn is not None:
        impls["trl selective_log_softmax"] = trl_fn
    group = LOGPROBS_GROUP.format(N, V)
    for impl, fn in impls.items():

        def run(impl=impl, fn=fn):
            call = lambda: fn(logits, tokens)  # noqa: E731
            with torch.no_grad():
                ms = median_ms(call, device, size["reps"], size["warmup"])
                peak = peak_extra_mib(call, device)
            gb_per_s = logits.numel() * logits.element_size() / ms / 1e6
            of_copy = gb_per_s / copy_gb_per_s if copy_gb_per_s else None
            row = dict(group=group, impl=impl, ms=ms, gb_per_s=gb_per_s, of_copy=of_copy)
            emit(lines, row=dict(row, peak_extra_mib=peak, baseline=impl == "log_softmax+gather"))

        attempt(lines, f"{group} {impl}", run)


def linear_token_logprobs(lines, device: str, size: dict, backend: str) -> None:
    M, H, V = size["linear"]
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(M, H, generator=g).to(DTYPE).to(device).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(DTYPE).to(device).requires_grad_(True)
    tokens = torch.randint(0, V, (M,), generator=g).to(device)
    group = LINEAR_GROUP.format(M, H, V)
    logits_mib = M * V * hidden.element_size() / 2**20
    grads_mib = (hidden.numel() + weight.numel()) * hidden.element_size() / 2**20
    impls = {
        f"fastppo[{backend}] fused": fastppo(ops.linear_token_logprobs, backend),
        "materialized logits (torch)": baselines.materialized_linear_logprobs,
    }
    for impl, fn in impls.items():

        def call(fn=fn):
            hidden.grad = weight.grad = None
            logprobs, entropy = fn(hidden, weight, tokens, with_entropy=True)
            (logprobs.sum() + entropy.sum()).backward()

        def run(impl=impl, call=call):
            ms = median_ms(call, device, max(size["reps"] // 2, 1), size["warmup"])
            hidden.grad = weight.grad = None
            peak = peak_extra_mib(call, device)
            working = None if peak is None else peak - grads_mib
            row = dict(group=group, impl=impl, ms=ms, peak_extra_mib=peak, grads_mb=grads_mib, logits_mb=logits_mib)
            row.update(working_mb=working, working_of_logits=None if working is None else working / logits_mib)
            emit(lines, row=dict(row, baseline=impl.startswith("materialized")))

        attempt(lines, f"{group} {impl}", run)


def sequence_cases(B: int, T: int, device: str, backend: str) -> dict:
    """{group: {implementation: call}} for the (B, T) sequence ops, the unfused baseline first."""
    x = baselines.sequence_inputs(B, T, device)
    logprobs = x["logprobs"].clone().requires_grad_(True)
    values = x["values"].clone().requires_grad_(True)
    shaping = (x["scores"], x["logprobs"], x["old_logprobs"], x["mask"], 0.05)
    gae, shape_rewards = fastppo(ops.gae, backend), fastppo(ops.shape_rewards, backend)
    policy, value = fastppo(ops.ppo_policy_loss, backend), fastppo(ops.ppo_value_loss, backend)

    def losses(policy_loss, value_loss):
        return lambda: baselines.policy_and_value_loss_backward(policy_loss, value_loss, x, logprobs, values)

    return {
        f"gae B={B} T={T}": {
            "python loop": lambda: baselines.python_loop_gae(x["rewards"], x["values"], x["mask"]),
            f"fastppo[{backend}]": lambda: gae(x["rewards"], x["values"], x["mask"], 1.0, 0.95),
        },
        f"shape_rewards B={B} T={T}": {
            "unfused torch": lambda: baselines.unfused_shape_rewards(*shaping),
            f"fastppo[{backend}]": lambda: shape_rewards(*shaping, "k1"),
        },
        f"policy+value loss fwd+bwd B={B} T={T}": {
            "unfused autograd": losses(baselines.unfused_policy_loss, baselines.unfused_value_loss),
            f"fastppo[{backend}]": losses(policy, value),
        },
    }


def sequence_ops(lines, device: str, size: dict, backend: str) -> None:
    for B, T in size["sequences"]:
        for group, impls in sequence_cases(B, T, device, backend).items():
            for impl, call in impls.items():

                def run(group=group, impl=impl, call=call):
                    # The Python loop launches ~T kernels a call: fewer tries, and nothing to compile.
                    loop = impl == "python loop"
                    reps, warmup = (
                        (size["loop_reps"], min(1, size["warmup"])) if loop else (size["reps"], size["warmup"])
                    )
                    ms = median_ms(call, device, reps, warmup)
                    emit(lines, row=dict(group=group, impl=impl, ms=ms, baseline=not impl.startswith("fastppo")))

                attempt(lines, f"{group} {impl}", run)


def main() -> None:
    lines, dry_run, device = child_arguments(__doc__)
    size = DRY if dry_run else FULL
    # Triton is what runs on a GPU; elsewhere (a dry run) it runs in the interpreter that gpu_proof.py turned on.
    reason = dispatch.unavailable_reason("triton", "token_logprobs", device)
    backend = "triton" if reason is None else "auto"
    emit(lines, info={"device": device, "backend": backend, "triton_unavailable": reason})
    copy = {}
    attempt(lines, "copy", lambda: copy.update(gb_per_s=measure_copy(lines, device, size)))
    token_logprobs(lines, device, size, backend, copy.get("gb_per_s"))
    linear_token_logprobs(lines, device, size, backend)
    sequence_ops(lines, device, size, backend)


if __name__ == "__main__":
    main()
