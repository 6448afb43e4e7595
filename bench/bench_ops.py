"""Op benchmarks: each fastppo backend against the baseline RLHF code uses today, in the same pytest run.

Every benchmark lands in a pytest-benchmark group named after the op and mode; `bench/report.py` divides the
baseline's median by each row's median to get the speed-ups, so ratios always come from one run on one machine.
`extra_info["largest_tensor_mb"]` is the largest tensor the call allocates (recorded once, outside the timing):
it shows which implementations materialize an (N, V) intermediate.

Sizes: CPU token_logprobs N = 4096, V = 32000 fp32; GAE and losses B = 64, T = 512. On CUDA, N = 16384 with
V = 32000 and 151936. FASTPPO_BENCH_QUICK=1 shrinks everything for the smoke test.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from bench import baselines
from fastppo import ops
from fastppo.ops import dispatch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
QUICK = os.environ.get("FASTPPO_BENCH_QUICK") == "1"


def sizes():
    if QUICK:
        return {
            "logprobs": [(64, 1000, torch.float32)],
            "seq": (8, 64),
            "linear": (64, 32, 1000),
            "sample": (4, 1000),
            "decode": (2, 4, 2, 8, 16),
        }
    if DEVICE == "cuda":
        logprobs = [(16384, V, dtype) for V in (32000, 151936) for dtype in (torch.bfloat16, torch.float32)]
        return {"logprobs": logprobs, "seq": (64, 512), "linear": (8192, 2048, 151936), "sample": (64, 151936)}
    return {
        "logprobs": [(4096, 32000, torch.float32)],
        "seq": (64, 512),
        "linear": (2048, 256, 32000),
        "sample": (16, 32000),
        "decode": (16, 4, 4, 64, 64),  # B, heads, key/value heads, head size, positions: the e2e bench's mid-decode
    }


SIZES = sizes()


def fastppo_backends(op):
    return [b for b in dispatch.BACKENDS if dispatch.unavailable_reason(b, op, DEVICE) is None and b != "triton"] + (
        ["triton"] if DEVICE == "cuda" and dispatch.unavailable_reason("triton", op, DEVICE) is None else []
    )


class LargestTensor(TorchDispatchMode):
    """The largest tensor an op allocates: outputs that share storage with an input (views, in-place results) are
    not allocations and are not counted."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = pytree.tree_leaves((args, kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.bytes = max(self.bytes, t.untyped_storage().nbytes())
        return out


def run_benchmark(benchmark, group, impl, fn, baseline=False, **info):
    with LargestTensor() as largest:
        fn()
    benchmark.group = group
    benchmark.extra_info.update(
        impl=impl, baseline=baseline, device=DEVICE, largest_tensor_mb=largest.bytes / 2**20, **info
    )
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    benchmark.pedantic(fn, rounds=5 if QUICK else 10, warmup_rounds=1, iterations=1)


def sync(fn):
    if DEVICE != "cuda":
        return fn

    def wrapped():
        out = fn()
        torch.cuda.synchronize()
        return out

    return wrapped


# ----------------------------------------------------------------------------------------------
# token_logprobs
# ----------------------------------------------------------------------------------------------


def logprob_impls():
    impls = [("log_softmax+gather", baselines.log_softmax_gather, True)]
    trl_fn, reason = baselines.trl_selective_log_softmax()
    if trl_fn is not None:
        impls.append(("trl selective_log_softmax", trl_fn, False))
    for backend in fastppo_backends("token_logprobs"):

        def fastppo_fn(logits, tokens, backend=backend):
            with ops.use_backend(backend):
                return ops.token_logprobs(logits, tokens)

        impls.append((f"fastppo[{backend}]", fastppo_fn, False))
    return impls


LOGPROB_IMPLS = logprob_impls()


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("N, V, dtype", SIZES["logprobs"], ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("impl, fn, baseline", LOGPROB_IMPLS, ids=[i[0] for i in LOGPROB_IMPLS])
def test_token_logprobs(benchmark, impl, fn, baseline, N, V, dtype, mode):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(N, V, generator=g) * 2).to(dtype).to(DEVICE)
    tokens = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    if mode == "forward":

        def call():
            with torch.no_grad():
                return fn(logits, tokens)
    else:
        logits.requires_grad_(True)

        def call():
            logits.grad = None
            fn(logits, tokens).sum().backward()

    group = f"token_logprobs {mode} N={N} V={V} {str(dtype)[6:]}"
    bytes_moved = N * V * logits.element_size() * (1 if mode == "forward" else 3)
    run_benchmark(benchmark, group, impl, sync(call), baseline, bytes=bytes_moved)


def with_backend(backend, fn):
    def call(*args):
        with ops.use_backend(backend):
            return fn(*args)

    return call


SAMPLERS = {
    "torch.multinomial": lambda logits, u: torch.multinomial(logits.softmax(-1), 1).squeeze(-1),  # HF generate's
    "exponential race": lambda logits, u: (logits.softmax(-1) / torch.empty_like(logits).exponential_()).argmax(-1),
    **{
        f"fastppo[{b}]": (lambda logits, u, b=b: with_backend(b, ops.sample_tokens)(logits, u))
        for b in fastppo_backends("sample_tokens")
    },
}


@pytest.mark.parametrize("impl", list(SAMPLERS), ids=lambda s: s)
def test_sample_tokens(benchmark, impl):
    """One decode step's sampling from (B, V) logits: the share of the rollout that is not the model."""
    B, V = SIZES["sample"]
    g = torch.Generator().manual_seed(0)
    logits, uniform = (torch.randn(B, V, generator=g) * 3).to(DEVICE), torch.rand(B, generator=g).to(DEVICE)
    call = sync(lambda: SAMPLERS[impl](logits, uniform))
    run_benchmark(benchmark, f"sample_tokens B={B} V={V}", impl, call, baseline=impl == "torch.multinomial")


def stock_decode_attention(qkv, cos, sin, keys, values, key_mask, heads, scale):
    """What transformers' Llama layer runs for one decode step: views, its rotary embedding, the cache writes, SDPA."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    B, G, _, D = keys.shape
    n = key_mask.shape[1]
    q, k, v = qkv.split([heads * D, G * D, G * D], dim=-1)
    q, k = apply_rotary_pos_emb(q.view(B, heads, 1, D), k.view(B, G, 1, D), cos, sin)
    keys[:, :, n - 1 : n], values[:, :, n - 1 : n] = k, v.view(B, G, 1, D)
    mask = key_mask[:, None, None]
    out = F.scaled_dot_product_attention(q, keys[:, :, :n], values[:, :, :n], mask, scale=scale, enable_gqa=G != heads)
    return out.reshape(B, heads * D)


DECODE_ATTENTION = {
    "rotary+SDPA (transformers)": stock_decode_attention,
    **{
        f"fastppo[{b}]": with_backend(b, ops.decode_attention)
        for b in fastppo_backends("decode_attention")
        if b == "native"
    },  # the torch backend is the float64 specification, not an implementation to time
}


@pytest.mark.skipif(DEVICE == "cuda", reason="the lean decode steps (and so decode_attention) run on CPUs only")
@pytest.mark.parametrize("impl", list(DECODE_ATTENTION), ids=lambda s: s)
def test_decode_attention(benchmark, impl):
    """One layer's attention in a decode step: rotary embedding, cache write, attention over the filled prefix."""
    B, heads, G, D, n = SIZES["decode"]
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, (heads + 2 * G) * D, generator=g)
    cos, sin = torch.randn(B, 1, D, generator=g), torch.randn(B, 1, D, generator=g)
    keys, values = torch.randn(B, G, 2 * n, D, generator=g), torch.randn(B, G, 2 * n, D, generator=g)
    key_mask = torch.ones(B, n, dtype=torch.bool)
    call = lambda: DECODE_ATTENTION[impl](qkv, cos, sin, keys, values, key_mask, heads, D**-0.5)  # noqa: E731
    run_benchmark(
        benchmark, f"decode_attention B={B} heads={heads} n={n}", impl, call, baseline=impl.startswith("rotary")
    )


# ----------------------------------------------------------------------------------------------
# GAE, reward shaping, losses: (B, T) sequence ops
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["python loop"] + [f"fastppo[{b}]" for b in fastppo_backends("gae")], ids=lambda s: s)
def test_gae(benchmark, impl):
    B, T = SIZES["seq"]
    x = baselines.sequence_inputs(B, T, DEVICE)
    if impl == "python loop":
        fn = baselines.python_loop_gae
    else:
        fn = with_backend(impl[8:-1], lambda r, v, m: ops.gae(r, v, m, 1.0, 0.95))
    call = sync(lambda: fn(x["rewards"], x["values"], x["mask"]))
    run_benchmark(benchmark, f"gae B={B} T={T}", impl, call, baseline=impl == "python loop")


def decoupled_gae_impls():
    """VAPO's advantage step: GAE with one lambda per row for the policy, lambda 1 for the critic's returns. The
    baseline is the peers' Python loop run twice; then fastppo's op run twice (one lambda each, as a kernel without
    decoupling must be), then its fused single scan."""

    def loop_twice(r, v, m, lam):
        return baselines.python_loop_gae(r, v, m, 1.0, lam)[0], baselines.python_loop_gae(r, v, m, 1.0, 1.0)[1]

    impls = {"python loop x2": loop_twice}
    for b in fastppo_backends("gae"):
        impls[f"fastppo[{b}] 2 passes"] = lambda r, v, m, lam, b=b: (
            with_backend(b, ops.gae)(r, v, m, 1.0, lam)[0],
            with_backend(b, ops.gae)(r, v, m, 1.0, 1.0)[1],
        )
        impls[f"fastppo[{b}] fused"] = lambda r, v, m, lam, b=b: with_backend(b, ops.gae)(r, v, m, 1.0, lam, 1.0)
    return impls


DECOUPLED_GAE_IMPLS = decoupled_gae_impls()


@pytest.mark.parametrize("impl", list(DECOUPLED_GAE_IMPLS), ids=lambda s: s)
def test_gae_decoupled_per_row_lambda(benchmark, impl):
    B, T = SIZES["seq"]
    x = baselines.sequence_inputs(B, T, DEVICE)
    lam = ops.length_adaptive_lam(x["mask"], 0.05)
    call = sync(lambda: DECOUPLED_GAE_IMPLS[impl](x["rewards"], x["values"], x["mask"], lam))
    group = f"gae per-row lambda + decoupled returns B={B} T={T}"
    run_benchmark(benchmark, group, impl, call, baseline=impl == "python loop x2")


@pytest.mark.parametrize(
    "impl", ["unfused torch"] + [f"fastppo[{b}]" for b in fastppo_backends("shape_rewards")], ids=lambda s: s
)
def test_shape_rewards(benchmark, impl):
    B, T = SIZES["seq"]
    x = baselines.sequence_inputs(B, T, DEVICE)
    args = (x["scores"], x["logprobs"], x["old_logprobs"], x["mask"], 0.05)
    if impl == "unfused torch":
        call = sync(lambda: baselines.unfused_shape_rewards(*args))
    else:
        call = sync(lambda: with_backend(impl[8:-1], ops.shape_rewards)(*args, "k1"))
    run_benchmark(benchmark, f"shape_rewards B={B} T={T}", impl, call, baseline=impl == "unfused torch")


@pytest.mark.parametrize(
    "impl", ["unfused autograd"] + [f"fastppo[{b}]" for b in fastppo_backends("ppo_policy_loss")], ids=lambda s: s
)
def test_policy_and_value_loss(benchmark, impl):
    """Forward + backward of policy loss + value loss, as one PPO micro-batch needs them."""
    B, T = SIZES["seq"]
    x = baselines.sequence_inputs(B, T, DEVICE)
    logprobs = x["logprobs"].clone().requires_grad_(True)
    values = x["values"].clone().requires_grad_(True)
    if impl == "unfused autograd":
        policy_loss, value_loss = baselines.unfused_policy_loss, baselines.unfused_value_loss
    else:
        policy_loss = with_backend(impl[8:-1], ops.ppo_policy_loss)
        value_loss = with_backend(impl[8:-1], ops.ppo_value_loss)

    def call():
        baselines.policy_and_value_loss_backward(policy_loss, value_loss, x, logprobs, values)

    run_benchmark(benchmark, f"policy+value loss fwd+bwd B={B} T={T}", impl, sync(call), impl == "unfused autograd")


# ----------------------------------------------------------------------------------------------
# LM head + log-probs without the logits
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["materialized logits", "fastppo fused"], ids=lambda s: s)
def test_linear_token_logprobs(benchmark, impl):
    N, H, V = SIZES["linear"]
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(N, H, generator=g).to(dtype).to(DEVICE).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(dtype).to(DEVICE).requires_grad_(True)
    tokens = torch.randint(0, V, (N,), generator=g).to(DEVICE)

    def call():
        hidden.grad = weight.grad = None
        if impl == "materialized logits":
            logits = hidden @ weight.t()
            logprobs = torch.log_softmax(logits.float(), -1).gather(-1, tokens[:, None]).squeeze(-1)
        else:
            logprobs = ops.linear_token_logprobs(hidden, weight, tokens)
        logprobs.sum().backward()

    group = f"linear_token_logprobs fwd+bwd N={N} H={H} V={V} {str(dtype)[6:]}"
    run_benchmark(benchmark, group, impl, sync(call), impl == "materialized logits", logits_mb=N * V * 4 / 2**20)
