"""One decode step of a Llama-family decoder (Llama, Mistral, Qwen2) straight from its weights, on a CPU.

transformers' forward serves every use: each decode step builds a 4D attention mask, calls a dozen modules per
layer and runs three q/k/v and two gate/up matmuls. At the bench's default size (hidden 256, 4 layers) that
overhead took longer than the step's weight reads (bench/README.md's phase tables). Here a step is the same
arithmetic in fewer, larger ops: q, k and v in one matmul against their concatenated weight, gate and up in
another, each weight prepared once per rollout for the step's row count (`DecodeLinear`), RMSNorm as one
`F.rms_norm`, and one native op (`ops.decode_attention`, in place of a dozen small ops per layer) for the rotary
embedding, the key and value written in place into the static cache that transformers' prefill filled, and the
attention over its filled prefix. The embedding, the rotary frequencies and the final norm are the model's own
modules; its apply_rotary_pos_emb is checked to be the rotate-half embedding that op applies. Numerics match the
model's forward up to float32 rounding (tests/engines/test_lean_decode.py); with `dtype` bf16 the matmuls take
bf16 copies of the weights and inputs, as the forward under bf16 autocast does, and all else stays float32.

    decoder = LeanDecoder.build(lm, cache, rows, dtype)   # None: not a supported model or not plain float32 layers
    hidden = decoder.step(token, position_ids, attention_mask)   # (B, H) for the next token's logits
    decoder.for_rows(rows)                                       # after the cache kept `rows` of its rows
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F

from fastppo import ops
from fastppo.models import backbone_of, plain_linear, unwrap
from fastppo.ops.reference import rotate_half_embedding
from fastppo.runtime.precision import cpuinfo_field

SUPPORTED = ("llama", "mistral", "qwen2")


def _stackable(linears) -> bool:
    """Plain float32 layers that either all have a bias or all have none: one matmul (+ one bias) for the group."""
    return all(plain_linear(m) for m in linears) and len({m.bias is None for m in linears}) == 1


# torch's prepacked GEMMs, which inductor uses for frozen CPU weights: private ops, so checked, not assumed.
def _mkl_prepacking() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def _onednn_prepacking() -> bool:
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and all(
        hasattr(ops, name) for name in ("_linear_pointwise", "_reorder_linear_weight")
    )


@functools.cache
def _cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
    return cpuinfo_field("vendor_id", cpuinfo)


# float32 products of fewer multiply-adds than this (rows x out x in) stay with MKL off Intel CPUs too: there oneDNN's
# per-call cost outweighs its faster kernels (`python -m bench.decode_linear` times both at a bench size's shapes).
ONEDNN_MIN_PRODUCT = 1 << 21


def prepacking(dtype: torch.dtype, multiply_adds: int) -> str:
    """Which library multiplies the decode's prepared weights: 'mkl', 'onednn' or 'none' (a transposed copy).

    float32: MKL on Intel CPUs and for small products; elsewhere oneDNN, which picks its kernels from the CPU's
    instruction sets: MKL's GEMM ran the decode's larger products slower on an AMD EPYC (`bench.decode_linear`).
    bf16: oneDNN, the library torch's bf16 products use on a CPU."""
    mkl = _mkl_prepacking() and dtype == torch.float32
    small = multiply_adds < ONEDNN_MIN_PRODUCT
    if mkl and (_cpu_vendor() == "GenuineIntel" or small or not _onednn_prepacking()):
        return "mkl"
    return "onednn" if _onednn_prepacking() else "none"


class DecodeLinear:
    """x @ W^T (+ b) (+ residual) for the `rows` rows of a decode step on a CPU, W (out, in) prepared once a rollout.

    A BLAS GEMM packs its weight operand into its own blocked layout on every call: one more pass over each weight
    per step, for a product that reads each weight once. Here the library (`prepacking`) packs it once, for
    `rows`-row products, and every step multiplies by the packed copy; another row count (the prefill) multiplies
    by the same copy, or by W itself for MKL. Without either library, a contiguous (in, out) copy, the layout other
    BLAS multiply without repacking. `dtype` bf16 multiplies a bf16 copy of W by the inputs rounded to bf16, as
    bf16 autocast does, and returns float32. The same products up to the dtype's rounding. The copy lives as long
    as this object."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int, dtype=torch.float32):
        self.weight, self.bias = weight.detach(), None if bias is None else bias.detach()
        self.rows, self.dtype = rows, dtype
        self.packing = prepacking(dtype, rows * self.weight.shape[0] * self.weight.shape[1])
        weight = self.weight.to(dtype)
        self.compute_bias = None if self.bias is None else self.bias.to(dtype)
        if self.packing == "mkl":
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
        elif self.packing == "onednn":
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
        else:
            self.packed = weight.t().contiguous()  # (in, out)

    @classmethod
    def stacked(cls, linears, rows: int, dtype=torch.float32) -> DecodeLinear:
        """One product for linears applied to the same input: their outputs concatenated."""
        if len(linears) == 1:
            return cls(linears[0].weight, linears[0].bias, rows, dtype)
        biases = [m.bias for m in linears]
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        return cls(torch.cat([m.weight.detach() for m in linears]), bias, rows, dtype)

    def for_rows(self, rows: int) -> DecodeLinear:
        """The same product prepared for `rows`-row steps (after finished rows left the decode)."""
        return DecodeLinear(self.weight, self.bias, rows, self.dtype)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        x = x.to(self.dtype)
        if self.packing == "mkl":
            out = torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, self.rows)
        elif self.packing == "onednn":
            out = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.compute_bias, "none", [], "")
        else:
            flat = x.reshape(-1, x.shape[-1])
            bias = self.compute_bias
            out = flat @ self.packed if bias is None else torch.addmm(bias, flat, self.packed)
            out = out.view(*x.shape[:-1], out.shape[-1])
        out = out.float()
        return out if residual is None else out.add_(residual)


class _Layer:
    def __init__(self, layer, cache_layer, rows: int, dtype: torch.dtype):
        attn, mlp = layer.self_attn, layer.mlp
        self.cache = cache_layer
        self.norm_in, self.norm_post = layer.input_layernorm, layer.post_attention_layernorm
        self.qkv = DecodeLinear.stacked([attn.q_proj, attn.k_proj, attn.v_proj], rows, dtype)
        self.o = DecodeLinear.stacked([attn.o_proj], rows, dtype)
        self.gate_up = DecodeLinear.stacked([mlp.gate_proj, mlp.up_proj], rows, dtype)
        self.down = DecodeLinear.stacked([mlp.down_proj], rows, dtype)
        self.heads, self.scaling = attn.config.num_attention_heads, attn.scaling

    def for_rows(self, rows: int) -> None:
        for name in ("qkv", "o", "gate_up", "down"):
            setattr(self, name, getattr(self, name).for_rows(rows))

    def __call__(self, x, cos, sin, key_mask):  # x (B, H), cos/sin (B, 1, head_dim), key_mask (B, n) bool
        h = F.rms_norm(x, x.shape[-1:], self.norm_in.weight, self.norm_in.variance_epsilon)
        # Rotary embedding, the cache write at position n - 1 and the attention over the n filled positions: one op.
        attn = ops.decode_attention(
            self.qkv(h), cos, sin, self.cache.keys, self.cache.values, key_mask, self.heads, self.scaling
        )
        self.cache.filled = key_mask.shape[-1]
        self.cache.cumulative_length.add_(1)  # as transformers' own update keeps it
        x = self.o(attn, residual=x)
        h = F.rms_norm(x, x.shape[-1:], self.norm_post.weight, self.norm_post.variance_epsilon)
        gate, up = self.gate_up(h).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up, residual=x)


def _rotate_half_rotary(attn) -> bool:
    """Whether the model's own apply_rotary_pos_emb is the rotate-half embedding `ops.decode_attention` applies:
    checked on random numbers once per rollout, so a model whose module defines another falls back to its forward."""
    rotate = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
    if rotate is None:
        return False
    g = torch.Generator().manual_seed(0)
    shapes = ((2, 3, 1, 8), (2, 1, 1, 8), (2, 1, 8), (2, 1, 8))  # q, k (B, heads, 1, D), cos, sin (B, 1, D)
    q, k, cos, sin = (torch.randn(shape, generator=g, dtype=torch.float64) for shape in shapes)
    try:
        q_model, k_model = rotate(q, k, cos, sin)
    except Exception:  # another signature: not the embedding we know
        return False
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, 1, D) against (B, heads, 1, D)
    return all(torch.allclose(mine, rotate_half_embedding(x, cos, sin)) for mine, x in ((q_model, q), (k_model, k)))


class LeanDecoder:
    """Decode steps over a transformers StaticCache whose layers are rollout's filled-prefix layers."""

    @classmethod
    def build(cls, lm, cache, rows: int, dtype: torch.dtype = torch.float32) -> LeanDecoder | None:
        """The decoder for `rows`-row steps of `lm` over `cache` with matmuls in `dtype` (float32 or bf16), or None
        where the stock step must run."""
        model = unwrap(lm)
        config = model.config
        if cache is None or config.model_type not in SUPPORTED or config.hidden_act != "silu":
            return None
        backbone = backbone_of(lm)
        if next(backbone.parameters()).device.type != "cpu":
            return None
        layers = list(backbone.layers)
        if len(cache.layers) != len(layers) or any(not hasattr(c, "filled") for c in cache.layers):
            return None  # a sliding-window layer (or another cache): transformers' path
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            groups = [
                [attn.q_proj, attn.k_proj, attn.v_proj],
                [attn.o_proj],
                [mlp.gate_proj, mlp.up_proj],
                [mlp.down_proj],
            ]
            if not all(_stackable(group) for group in groups):
                return None
        if not _rotate_half_rotary(layers[0].self_attn):
            return None
        return cls(backbone, cache, rows, dtype)

    def __init__(self, backbone, cache, rows: int, dtype: torch.dtype):
        self.backbone = backbone
        self.layers = [
            _Layer(layer, cache_layer, rows, dtype)
            for layer, cache_layer in zip(backbone.layers, cache.layers, strict=True)
        ]

    def for_rows(self, rows: int) -> None:
        """Prepare the weights for `rows`-row steps: the cache's rows were selected with it (`reorder_cache`)."""
        for layer in self.layers:
            layer.for_rows(rows)

    @torch.no_grad()
    def step(self, token: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """token (B,) at position_ids (B, 1), attention_mask (B, n) over the cache with it: the final hidden state
        (B, H) that predicts the next token."""
        x = self.backbone.embed_tokens(token[:, None])  # (B, 1, H)
        cos, sin = self.backbone.rotary_emb(x, position_ids)
        x = x[:, 0]
        key_mask = attention_mask.bool()
        for layer in self.layers:
            x = layer(x, cos, sin, key_mask)
        return self.backbone.norm(x)
