"""LeanDecoder: the Llama-family decode step from the weights draws what transformers' forward draws."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import fastppo.engines.hf as rollout
import fastppo.engines.lean_decode as lean_decode
from fastppo.data import tokenize_prompts
from fastppo.engines.hf import generate, static_cache
from fastppo.engines.lean_decode import DecodeLinear, LeanDecoder
from tests.tiny_models import build_tokenizer, save_tiny_models


def _decode_both_ways(lm, monkeypatch, **kwargs):
    tokenizer = build_tokenizer()
    ids, mask = tokenize_prompts(["w1 w2 w3 w4 w5", "w6", "w7 w8"], tokenizer, max_length=8)  # left-padded
    torch.manual_seed(0)
    lean = generate(lm, tokenizer, ids, mask, max_new_tokens=8, end_ids=[], with_logprobs=True, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(rollout.LeanDecoder, "build", classmethod(lambda cls, lm, cache, rows: None))
        torch.manual_seed(0)
        stock = generate(lm, tokenizer, ids, mask, max_new_tokens=8, end_ids=[], with_logprobs=True, **kwargs)
    return lean, stock


@pytest.mark.parametrize(
    "arch, overrides",
    [("llama", {}), ("qwen2", {}), ("llama", {"attention_bias": True, "mlp_bias": True, "num_key_value_heads": 4})],
    ids=["llama-gqa", "qwen2-qkv-bias", "llama-biases-mha"],
)
def test_lean_steps_draw_what_transformers_forward_draws(tmp_path, monkeypatch, arch, overrides):
    policy, _ = save_tiny_models(tmp_path, arch, **overrides)
    lm = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    if overrides.get("attention_bias"):  # random biases: zero ones would hide a bias left out
        with torch.no_grad():
            for module in lm.modules():
                if isinstance(module, torch.nn.Linear) and module.bias is not None:
                    module.bias.normal_()
    assert LeanDecoder.build(lm, static_cache(lm, 16), 3) is not None
    lean, stock = _decode_both_ways(lm, monkeypatch)
    assert torch.equal(lean.response_ids, stock.response_ids)
    torch.testing.assert_close(lean.logprobs, stock.logprobs, atol=1e-5, rtol=0)


def test_other_models_keep_the_transformers_path(tiny_models, tmp_path):
    for arch in ("gpt2", "gpt_neox"):
        lm = AutoModelForCausalLM.from_pretrained(tiny_models[arch][0], dtype=torch.float32)
        assert LeanDecoder.build(lm, static_cache(lm, 16), 3) is None, arch
    policy, _ = save_tiny_models(tmp_path, "granite")  # llama-shaped, but with its own multipliers
    lm = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    assert LeanDecoder.build(lm, static_cache(lm, 16), 3) is None
    lm = AutoModelForCausalLM.from_pretrained(tiny_models["llama"][0], dtype=torch.float32)
    assert LeanDecoder.build(lm, None, 3) is None  # no static cache
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(lm, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert LeanDecoder.build(lora, static_cache(lora, 16), 3) is None  # adapters are not plain layers


def test_a_rotary_embedding_other_than_rotate_half_keeps_the_transformers_path(tiny_models, monkeypatch):
    """decode_attention applies the rotate-half embedding: a model module whose apply_rotary_pos_emb computes
    anything else (a future transformers, a remote-code model) must not be decoded with it."""
    import transformers.models.llama.modeling_llama as llama

    lm = AutoModelForCausalLM.from_pretrained(tiny_models["llama"][0], dtype=torch.float32)
    assert LeanDecoder.build(lm, static_cache(lm, 16), 3) is not None
    interleaved = lambda q, k, cos, sin: (q * cos[:, None] + q.flip(-1) * sin[:, None], k)  # noqa: E731
    monkeypatch.setattr(llama, "apply_rotary_pos_emb", interleaved)
    assert LeanDecoder.build(lm, static_cache(lm, 16), 3) is None


@pytest.mark.parametrize("mkl", [True, False], ids=["mkl-packed", "transposed-copy"])
def test_decode_linear_is_the_linear_layer(monkeypatch, mkl):
    """DecodeLinear against the float64 product: its own row count (the packed path), another (the prefill: the
    weight itself), 3D inputs, strided ones (the prefill's last position), a bias, a residual; with MKL's prepacking
    and without it."""
    if mkl and not lean_decode._mkl_prepacking():
        pytest.skip("this torch has no MKL prepacking")
    monkeypatch.setattr(lean_decode, "_mkl_prepacking", lambda: mkl)
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(37, 19, generator=g), torch.randn(37, generator=g)
    for b in (None, bias):
        linear = DecodeLinear(weight, b, rows=5)
        assert (linear.packed is not None) == mkl
        inputs = [torch.randn(*shape, generator=g) for shape in ((5, 19), (5, 1, 19), (11, 19), (2, 3, 19), (1, 19))]
        inputs += [torch.randn(5, 4, 19, generator=g)[:, -1], torch.randn(19, 5, generator=g).t()]  # not contiguous
        for x in inputs:
            residual = torch.randn(*x.shape[:-1], 37, generator=g)
            expected = torch.nn.functional.linear(x.double(), weight.double(), None if b is None else b.double())
            torch.testing.assert_close(linear(x).double(), expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(linear(x, residual).double(), expected + residual, atol=1e-5, rtol=1e-5)
