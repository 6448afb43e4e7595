"""PolicyValueModel: log-probs equal the plain LM's on every architecture; one backbone; quantized references."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from fastppo.engines.hf import generate
from fastppo.models import (
    PolicyValueModel,
    frozen_reference,
    load_frozen,
    load_pretrained,
    load_trainable_lm,
    reference_logprobs,
)
from tests.tiny_models import RELEASE_DTYPE, build_tokenizer, save_tiny_models

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py

ARCHS = ["llama", "qwen2", "gpt2", "gpt_neox"]


def padded_batch(tokenizer, lm):
    """Left-padded prompts of different lengths, and responses sampled by the model (right-padded)."""
    from fastppo.data import tokenize_prompts

    prompt_ids, prompt_mask = tokenize_prompts(["w1 w2 w3", "w4", "w5 w6"], tokenizer, max_length=8)
    torch.manual_seed(0)
    response_ids, response_mask, *_ = generate(lm, tokenizer, prompt_ids, prompt_mask, max_new_tokens=5)
    return prompt_ids, prompt_mask, response_ids, response_mask


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "logits"])
def test_logprobs_match_the_plain_model_per_sequence(tiny_models, arch, fused):
    """Scoring a padded batch gives each sequence the log-probs the LM gives it alone, unpadded."""
    tokenizer = build_tokenizer()
    lm = AutoModelForCausalLM.from_pretrained(tiny_models[arch][0], dtype=torch.float32)
    model = PolicyValueModel(lm, fused_logprobs=fused)
    prompt_ids, prompt_mask, response_ids, response_mask = padded_batch(tokenizer, lm)
    P = prompt_ids.shape[1]
    input_ids = torch.cat([prompt_ids, response_ids], 1)
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    logprobs, entropy, values = model(input_ids, attention_mask, P, temperature=0.7)
    assert logprobs.shape == entropy.shape == values.shape == response_ids.shape
    for row in range(3):
        ids = input_ids[row][attention_mask[row].bool()].unsqueeze(0)
        n_prompt = int(prompt_mask[row].sum())
        logits = lm(ids).logits[0, n_prompt - 1 : -1] / 0.7
        expected = torch.log_softmax(logits.double(), -1).gather(-1, ids[0, n_prompt:, None]).squeeze(-1)
        n = int(response_mask[row].sum())
        torch.testing.assert_close(logprobs[row, :n].double(), expected, atol=1e-4, rtol=1e-4)
    ref = reference_logprobs(lm, input_ids, attention_mask, P, 0.7, fused)
    torch.testing.assert_close(ref, logprobs)


def test_shared_critic_holds_one_backbone(tiny_models):
    lm = AutoModelForCausalLM.from_pretrained(tiny_models["llama"][0], dtype=torch.float32)
    n_lm = sum(p.numel() for p in lm.parameters())
    shared = PolicyValueModel(lm, critic="shared")
    hidden = lm.config.hidden_size
    assert sum(p.numel() for p in shared.parameters()) == n_lm + hidden + 1  # + value head only
    ids = {id(p) for p in shared.parameters()}
    assert len(ids) == len(list(shared.parameters()))
    lm = AutoModelForCausalLM.from_pretrained(tiny_models["llama"][0], dtype=torch.float32)
    separate = PolicyValueModel(lm, critic="separate")
    n_backbone = sum(p.numel() for p in separate.critic_backbone.parameters())
    assert sum(p.numel() for p in separate.parameters()) == n_lm + n_backbone + hidden + 1


def _bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("arch", ARCHS)
def test_frozen_models_keep_the_checkpoints_dtype_and_compute_as_float32(tiny_models, arch):
    """On CPU the reference and the reward model hold a bf16/fp16 checkpoint's matrices as stored (about half the
    bytes of a float32 copy) and give bitwise the outputs of the model converted to float32."""
    cpu, stored = torch.device("cpu"), RELEASE_DTYPE[arch]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 90, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding in one row
    for auto_class, path in (
        (AutoModelForCausalLM, tiny_models[arch][0]),
        (AutoModelForSequenceClassification, tiny_models[arch][1]),
    ):
        fp32 = load_pretrained(auto_class, path, "none", cpu, torch.float32).eval()
        frozen = load_frozen(auto_class, path, "none", cpu)
        assert {p.dtype for p in frozen.parameters()} >= {stored}
        assert all(not p.requires_grad for p in frozen.parameters())
        ratio = _bytes(frozen) / _bytes(fp32)
        assert ratio == 1.0 if stored == torch.float32 else ratio < 0.6
        with torch.no_grad():
            assert torch.equal(
                frozen(input_ids=ids, attention_mask=mask).logits, fp32(input_ids=ids, attention_mask=mask).logits
            )
    # the reference copied from the policy (no reference path given) goes back to the checkpoint's dtype exactly
    lm, checkpoint_dtype = load_trainable_lm(tiny_models[arch][0], cpu)
    lm.eval()
    reference = frozen_reference(lm, lm, "none", cpu, checkpoint_dtype)
    assert {p.dtype for p in reference.parameters()} >= {stored}
    assert torch.equal(
        reference_logprobs(reference, ids, mask, 4, 1.0, True), reference_logprobs(lm, ids, mask, 4, 1.0, True)
    )


def test_4bit_reference_is_under_a_third_of_fp32(tmp_path):
    policy, _ = save_tiny_models(tmp_path, "llama", hidden=256, layers=4)
    fp32 = load_pretrained(AutoModelForCausalLM, policy, "none", torch.device("cpu"), torch.float32)
    nf4 = load_pretrained(AutoModelForCausalLM, policy, "4bit", torch.device("cpu"))
    assert nf4.get_memory_footprint() < fp32.get_memory_footprint() / 3
    int8 = load_pretrained(AutoModelForCausalLM, policy, "8bit", torch.device("cpu"))
    assert int8.get_memory_footprint() < fp32.get_memory_footprint() / 2
    # and the quantized reference still scores: finite log-probs close to the fp32 model's
    tokenizer = build_tokenizer()
    prompt_ids, prompt_mask, response_ids, response_mask = padded_batch(tokenizer, fp32)
    input_ids = torch.cat([prompt_ids, response_ids], 1)
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    exact = reference_logprobs(fp32, input_ids, attention_mask, prompt_ids.shape[1], 1.0, True)
    approx = reference_logprobs(nf4, input_ids, attention_mask, prompt_ids.shape[1], 1.0, True)
    assert torch.isfinite(approx).all()
    assert (approx - exact)[response_mask.bool()].abs().mean() < 0.5
