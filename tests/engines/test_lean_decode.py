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
        patch.setattr(rollout.LeanDecoder, "build", classmethod(lambda cls, lm, cache, rows, dtype=None: None))
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


PACKINGS = {"mkl": lean_decode._mkl_prepacking, "onednn": lean_decode._onednn_prepacking, "none": lambda: True}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize("packing", list(PACKINGS))
def test_decode_linear_is_the_linear_layer(monkeypatch, packing, dtype):
    """DecodeLinear against the float64 product of its inputs rounded to `dtype`: its own row count (the packed
    path), another (the prefill), 3D inputs, strided ones (the prefill's last position), a bias, a residual; with
    each library's prepacking and without; float32 out whatever it multiplies in."""
    if not PACKINGS[packing]() or (packing == "mkl" and dtype != torch.float32):
        pytest.skip(f"this torch has no {packing} prepacking for {dtype}")
    monkeypatch.setattr(lean_decode, "prepacking", lambda dtype, multiply_adds: packing)
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(37, 19, generator=g), torch.randn(37, generator=g)
    rounded = lambda x: x.to(dtype).double()  # noqa: E731
    # float32: products to float32 rounding; bf16: the output is rounded to bf16 (8 bits) before it turns float32
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2**-7}
    for b in (None, bias):
        linear = DecodeLinear(weight, b, rows=5, dtype=dtype)
        assert linear.packing == packing
        inputs = [torch.randn(*shape, generator=g) for shape in ((5, 19), (5, 1, 19), (11, 19), (2, 3, 19), (1, 19))]
        inputs += [torch.randn(5, 4, 19, generator=g)[:, -1], torch.randn(19, 5, generator=g).t()]  # not contiguous
        for x in inputs:
            residual = torch.randn(*x.shape[:-1], 37, generator=g)
            expected = torch.nn.functional.linear(rounded(x), rounded(weight), None if b is None else rounded(b))
            out = linear(x)
            assert out.dtype == torch.float32 and out.shape == expected.shape
            torch.testing.assert_close(out.double(), expected, **tolerance)
            torch.testing.assert_close(linear(x, residual).double(), expected + residual, **tolerance)
        if dtype == torch.bfloat16:  # the bf16 product, not float32's: catches a copy left in float32
            exact = torch.nn.functional.linear(x.double(), weight.double(), None if b is None else b.double())
            assert (linear(x).double() - exact).abs().max() > 1e-4


def test_decode_prepacking_follows_the_cpu(monkeypatch, tmp_path):
    """float32: MKL's packing on Intel CPUs and for small products, oneDNN's on others (where it is there); bf16:
    oneDNN's."""
    read_vendor = lean_decode._cpu_vendor.__wrapped__
    monkeypatch.setattr(lean_decode, "_mkl_prepacking", lambda: True)
    monkeypatch.setattr(lean_decode, "_onednn_prepacking", lambda: True)
    large, small = lean_decode.ONEDNN_MIN_PRODUCT, lean_decode.ONEDNN_MIN_PRODUCT - 1
    for vendor, float32 in (("GenuineIntel", "mkl"), ("AuthenticAMD", "onednn"), ("", "onednn")):
        monkeypatch.setattr(lean_decode, "_cpu_vendor", lambda vendor=vendor: vendor)
        assert lean_decode.prepacking(torch.float32, large) == float32
        assert lean_decode.prepacking(torch.float32, small) == "mkl"
        assert lean_decode.prepacking(torch.bfloat16, small) == "onednn"
        assert lean_decode.prepacking(torch.bfloat16, large) == "onednn"
    monkeypatch.setattr(lean_decode, "_onednn_prepacking", lambda: False)
    assert lean_decode.prepacking(torch.float32, large) == "mkl"
    assert lean_decode.prepacking(torch.bfloat16, large) == "none"
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu\n")
    assert read_vendor(str(cpuinfo)) == "AuthenticAMD"
    assert read_vendor(str(tmp_path / "missing")) == ""
