"""decode_attention on every backend against the float64 reference: the attention output, the rotated key and the
value written into the cache at position n - 1, and every other cache position left as it was."""

from __future__ import annotations

import pytest
import torch

from fastppo import ops
from fastppo.ops import reference
from tests.ops.helpers import FLOAT_DTYPES, assert_grad_close, backend_params, f64, randn, run_with, seeded


def rotary(B: int, D: int, positions: torch.Tensor, dtype=torch.float32):
    """(cos, sin) (B, D) in the rotate-half layout at each row's position, as Llama's rotary embedding makes them."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = positions.double()[:, None] * inv_freq[None]  # (B, D / 2)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def inputs(B, heads, G, D, L, n, dtype, seed=0, scale=1.0):
    qkv = randn(B, (heads + 2 * G) * D, dtype=dtype, scale=scale, seed=seed)
    keys = randn(B, G, L, D, dtype=dtype, seed=seed + 1)
    values = randn(B, G, L, D, dtype=dtype, seed=seed + 2)
    cos, sin = rotary(B, D, torch.randint(0, 4096, (B,), generator=seeded(seed + 3)))
    key_mask = torch.rand(B, n, generator=seeded(seed + 4)) < 0.8  # left padding and gaps, as prompts leave
    key_mask[:, -1] = True  # the new token attends to itself
    return qkv, cos, sin, keys, values, key_mask


def check(backend, B, heads, G, D, L, n, dtype, seed=0, scale=1.0, key_mask=None):
    qkv, cos, sin, keys, values, mask = inputs(B, heads, G, D, L, n, dtype, seed, scale)
    key_mask = mask if key_mask is None else key_mask
    expected_keys, expected_values = f64(keys).clone(), f64(values).clone()
    expected = reference.decode_attention(f64(qkv), cos, sin, expected_keys, expected_values, key_mask, heads, 0.3)
    before_keys, before_values = keys.clone(), values.clone()
    out = run_with(backend, ops.decode_attention, qkv, cos, sin, keys, values, key_mask, heads, 0.3)
    assert out.dtype == dtype and out.shape == (B, heads * D)
    assert_grad_close(out, expected, dtype, "output")  # one rounding to dtype on top of the float32 arithmetic
    assert_grad_close(keys[:, :, n - 1], expected_keys[:, :, n - 1], dtype, "the new key")
    assert torch.equal(values[:, :, n - 1], expected_values[:, :, n - 1].to(dtype)), "the new value"
    untouched = torch.arange(L) != n - 1
    assert torch.equal(keys[:, :, untouched], before_keys[:, :, untouched]), "other key positions written"
    assert torch.equal(values[:, :, untouched], before_values[:, :, untouched]), "other value positions written"
    return out


@pytest.mark.parametrize("backend", backend_params("decode_attention"))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    "B, heads, G, D, L, n",
    [
        (16, 4, 4, 64, 96, 50),  # the bench's decode: multi-head
        (5, 8, 2, 6, 9, 9),  # grouped-query attention, a full cache, an odd row count
        (3, 4, 1, 80, 17, 1),  # multi-query attention at the first position: the new token alone
        (1, 2, 2, 2, 3, 2),
    ],
)
def test_matches_reference(backend, dtype, B, heads, G, D, L, n):
    check(backend, B, heads, G, D, L, n, dtype, seed=B + n)


@pytest.mark.parametrize("backend", backend_params("decode_attention"))
def test_large_scores_and_rows_with_nothing_to_attend_to(backend):
    """Scores far beyond exp's range (|q k| scale ~ 1e3) softmax like any other; a row whose mask is all False gets
    zeros (and its cache is still written)."""
    B, heads, G, D, L, n = 4, 4, 2, 32, 12, 10
    check(backend, B, heads, G, D, L, n, torch.float32, seed=7, scale=30.0)
    key_mask = torch.ones(B, n, dtype=torch.bool)
    key_mask[2] = False
    out = check(backend, B, heads, G, D, L, n, torch.float32, seed=8, key_mask=key_mask)
    assert torch.equal(out[2], torch.zeros_like(out[2]))


def test_the_reference_is_the_llama_layers_own_rotary_and_attention():
    """The reference itself against transformers' Llama: its apply_rotary_pos_emb, then SDPA with GQA."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    B, heads, G, D, L, n = 3, 4, 2, 16, 8, 6
    qkv, cos, sin, keys, values, key_mask = inputs(B, heads, G, D, L, n, torch.float64, seed=11)
    q, k, v = qkv.split([heads * D, G * D, G * D], dim=-1)
    q, k = apply_rotary_pos_emb(q.view(B, heads, 1, D), k.view(B, G, 1, D), cos[:, None], sin[:, None])
    past_k, past_v = keys.clone(), values.clone()
    past_k[:, :, n - 1], past_v[:, :, n - 1] = k[:, :, 0], v.view(B, G, D)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, past_k[:, :, :n], past_v[:, :, :n], attn_mask=key_mask[:, None, None], scale=0.3, enable_gqa=True
    )
    out = reference.decode_attention(qkv, cos, sin, keys, values, key_mask, heads, 0.3)
    torch.testing.assert_close(out, expected.reshape(B, heads * D), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(keys, past_k, rtol=1e-12, atol=1e-12)


def test_bad_shapes_are_refused():
    qkv, cos, sin, keys, values, key_mask = inputs(2, 4, 2, 8, 6, 3, torch.float32)
    with pytest.raises(ValueError, match="multiple of G"):
        ops.decode_attention(qkv, cos, sin, keys, values, key_mask, 3, 1.0)
    with pytest.raises(ValueError, match="qkv must be"):
        ops.decode_attention(qkv[:, :-1], cos, sin, keys, values, key_mask, 4, 1.0)
    with pytest.raises(ValueError, match="key_mask must be"):
        ops.decode_attention(qkv, cos, sin, keys, values, torch.ones(2, 7, dtype=torch.bool), 4, 1.0)
