"""One decode step of a Llama-family decoder (Llama, Mistral, Qwen2) straight from its weights, on a CPU.

transformers' forward serves every use: each decode step builds a 4D attention mask, calls a dozen modules per
layer and runs three q/k/v and two gate/up matmuls. At the bench's default size (hidden 256, 4 layers) that
overhead took longer than the step's weight reads (bench/README.md's phase tables). Here a step is the same
arithmetic in fewer, larger ops: q, k and v in one matmul against a concatenated (in, out) weight, gate and up in
another, RMSNorm as one `F.rms_norm`, the key and value written in place into the static cache that transformers'
prefill filled, attention over its filled prefix. The embedding, the rotary frequencies and their application, and
the final norm are the model's own modules and functions. Numerics match the model's forward up to float32 rounding
(tests/trainer/test_real_checkpoints.py compares the decode's log-probs with the training forward's).

    decoder = LeanDecoder.build(lm, cache)   # None: not a supported model, or not plain float32 layers
    hidden = decoder.step(token, position_ids, attention_mask)   # (B, H) for the next token's logits
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

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
        self.heads, self.head_dim = attn.config.num_attention_heads, attn.head_dim
        self.kv_heads, self.scaling = attn.config.num_key_value_heads, attn.scaling
        self.rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # the model's own

    def __call__(self, x, cos, sin, key_mask):  # x (B, H), key_mask (B, 1, 1, n) bool
        B, n = x.shape[0], key_mask.shape[-1]
        h = F.rms_norm(x, x.shape[-1:], self.norm_in.weight, self.norm_in.variance_epsilon)
        qkv = _linear(h, self.qkv, self.qkv_bias)
        q_width, kv_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q = qkv[:, :q_width].view(B, self.heads, 1, self.head_dim)
        k = qkv[:, q_width : q_width + kv_width].view(B, self.kv_heads, 1, self.head_dim)
        v = qkv[:, q_width + kv_width :].view(B, self.kv_heads, 1, self.head_dim)
        q, k = self.rotate(q, k, cos, sin)
        keys, values = self.cache.keys, self.cache.values  # (B, kv_heads, max_length, head_dim)
        keys[:, :, n - 1 : n] = k
        values[:, :, n - 1 : n] = v
        self.cache.filled = n
        self.cache.cumulative_length.add_(1)  # as transformers' own update keeps it
        attn = F.scaled_dot_product_attention(q, keys[:, :, :n], values[:, :, :n], attn_mask=key_mask,
                                              scale=self.scaling, enable_gqa=self.kv_heads != self.heads)  # fmt: skip
        x = x + _linear(attn.reshape(B, q_width), self.o, self.o_bias)
        h = F.rms_norm(x, x.shape[-1:], self.norm_post.weight, self.norm_post.variance_epsilon)
        gate, up = _linear(h, self.gate_up, self.gate_up_bias).chunk(2, dim=-1)
        return x + _linear(F.silu(gate) * up, self.down, self.down_bias)


def _linear(x, weight_t, bias):
    return x @ weight_t if bias is None else torch.addmm(bias, x, weight_t)


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
        key_mask = attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            x = layer(x, cos, sin, key_mask)
        return self.backbone.norm(x)
