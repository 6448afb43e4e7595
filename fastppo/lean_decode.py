"""One decode step of a Llama-family decoder (Llama, Mistral, Qwen2) straight from its weights, on a CPU.

transformers' forward serves every use: each decode step builds a 4D attention mask, calls a dozen modules per
layer and runs three q/k/v and two gate/up matmuls. At the bench's default size (hidden 256, 4 layers) that
overhead took longer than the step's weight reads (bench/README.md's phase tables). Here a step is the same
arithmetic in fewer, larger ops: q, k and v in one matmul against a concatenated (in, out) weight, gate and up in
another, RMSNorm as one `F.rms_norm`, and the rotary embedding, the key and value written in place into the static
cache that transformers' prefill filled, and the attention over its filled prefix in one native op
(`ops.decode_attention`: a dozen small ops took ~0.5 ms a layer). The embedding, the rotary frequencies and the
final norm are the model's own modules; its apply_rotary_pos_emb is checked to be the rotate-half embedding that
op applies. Numerics match the model's forward up to float32 rounding (tests/trainer/test_lean_decode.py).

    decoder = LeanDecoder.build(lm, cache)   # None: not a supported model, or not plain float32 layers
    hidden = decoder.step(token, position_ids, attention_mask)   # (B, H) for the next token's logits
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from fastppo import ops
from fastppo.models import backbone_of, plain_linear, unwrap

SUPPORTED = ("llama", "mistral", "qwen2")


def _stackable(linears) -> bool:
    """Plain float32 layers that either all have a bias or all have none: one matmul (+ one bias) for the group."""
    return all(plain_linear(m) for m in linears) and len({m.bias is None for m in linears}) == 1


def _stacked(linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (in, sum of outs) weight of linears applied to one input, and their concatenated bias (None: none)."""
    weight = torch.cat([m.weight.detach() for m in linears]).t().contiguous()
    biases = [m.bias for m in linears]
    return weight, None if biases[0] is None else torch.cat([b.detach() for b in biases])


class _Layer:
    def __init__(self, layer, cache_layer):
        attn, mlp = layer.self_attn, layer.mlp
        self.cache = cache_layer
        self.norm_in, self.norm_post = layer.input_layernorm, layer.post_attention_layernorm
        self.qkv, self.qkv_bias = _stacked([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o, self.o_bias = _stacked([attn.o_proj])
        self.gate_up, self.gate_up_bias = _stacked([mlp.gate_proj, mlp.up_proj])
        self.down, self.down_bias = _stacked([mlp.down_proj])
        self.heads, self.scaling = attn.config.num_attention_heads, attn.scaling

    def __call__(self, x, cos, sin, key_mask):  # x (B, H), cos/sin (B, 1, head_dim), key_mask (B, n) bool
        h = F.rms_norm(x, x.shape[-1:], self.norm_in.weight, self.norm_in.variance_epsilon)
        qkv = _linear(h, self.qkv, self.qkv_bias)
        # Rotary embedding, the cache write at position n - 1 and the attention over the n filled positions: one op.
        attn = ops.decode_attention(qkv, cos, sin, self.cache.keys, self.cache.values, key_mask, self.heads,
                                    self.scaling)  # fmt: skip
        self.cache.filled = key_mask.shape[-1]
        self.cache.cumulative_length.add_(1)  # as transformers' own update keeps it
        x = _linear(attn, self.o, self.o_bias, residual=x)
        h = F.rms_norm(x, x.shape[-1:], self.norm_post.weight, self.norm_post.variance_epsilon)
        gate, up = _linear(h, self.gate_up, self.gate_up_bias).chunk(2, dim=-1)
        return _linear(F.silu(gate) * up, self.down, self.down_bias, residual=x)


def _linear(x, weight_t, bias, residual=None):
    """x @ weight_t (+ bias) (+ residual), as one addmm where there is one term to add."""
    if bias is None:
        return x @ weight_t if residual is None else torch.addmm(residual, x, weight_t)
    out = torch.addmm(bias, x, weight_t)
    return out if residual is None else residual + out


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

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]

    return torch.allclose(q_model, rotate_half(q)) and torch.allclose(k_model, rotate_half(k))


class LeanDecoder:
    """Decode steps over a transformers StaticCache whose layers are rollout's filled-prefix layers."""

    @classmethod
    def build(cls, lm, cache) -> LeanDecoder | None:
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
            groups = [[attn.q_proj, attn.k_proj, attn.v_proj], [attn.o_proj], [mlp.gate_proj, mlp.up_proj],
                      [mlp.down_proj]]  # fmt: skip
            if not all(_stackable(group) for group in groups):
                return None
        if not _rotate_half_rotary(layers[0].self_attn):
            return None
        return cls(backbone, cache)

    def __init__(self, backbone, cache):
        self.backbone = backbone
        self.layers = [
            _Layer(layer, cache_layer) for layer, cache_layer in zip(backbone.layers, cache.layers, strict=True)
        ]

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
