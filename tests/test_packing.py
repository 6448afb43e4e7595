"""Packed forwards (padding_free): each sequence gets the log-probs it gets alone, for every architecture the tests
use, or packing is refused for it."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from fastppo import packing
from fastppo.models import backbone_of, final_hidden, response_logprobs
from tests.tiny_models import save_tiny_models

# Whether each packs: OPT's learned positions are counted from the attention mask, so a packed row (no mask) would
# run on without restarting them; the start-up check must find that.
ARCHS = {"llama": True, "qwen2": True, "granite": True, "gpt2": True, "gpt_neox": True, "opt": False}


def _padded_batch(vocab_size: int):
    """Three rows of left-padded prompts (lengths 3, 1, 5) and right-padded responses (lengths 4, 1, 2)."""
    g = torch.Generator().manual_seed(0)
    prompt_lengths, response_lengths, P, T = (3, 1, 5), (4, 1, 2), 5, 4
    ids = torch.randint(3, vocab_size, (3, P + T), generator=g)
    mask = torch.zeros(3, P + T, dtype=torch.long)
    for row, (p, t) in enumerate(zip(prompt_lengths, response_lengths, strict=True)):
        mask[row, P - p : P + t] = 1
    return ids.masked_fill(mask == 0, 0), mask, P


@pytest.mark.parametrize("arch", list(ARCHS))
def test_a_packed_forward_gives_each_sequence_its_own_logprobs_or_is_refused(tmp_path, arch):
    policy, _ = save_tiny_models(tmp_path, arch)
    lm = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    backbone = backbone_of(lm)
    why = packing.refusal(lm, backbone)
    assert (why is None) == ARCHS[arch], why
    if why is not None:
        return
    ids, mask, P = _padded_batch(lm.config.vocab_size)
    with torch.no_grad():
        packed = packing.packed_hidden(backbone, ids, mask)  # (B, L, H), zeros at the padding
        padded = final_hidden(backbone, ids, mask)
        assert (packed[mask == 0] == 0).all()
        for row in range(len(ids)):
            real = mask[row].bool()
            alone = backbone(input_ids=ids[row, real][None]).last_hidden_state[0]
            torch.testing.assert_close(packed[row, real], alone, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(padded[row, real], alone, atol=1e-5, rtol=1e-5)
        response = ids[:, P:]
        packed_lp, _ = response_logprobs(lm, packed[:, P - 1 : -1], response, 1.0, True)
        padded_lp, _ = response_logprobs(lm, padded[:, P - 1 : -1], response, 1.0, True)
    response_mask = mask[:, P:].bool()
    torch.testing.assert_close(packed_lp[response_mask], padded_lp[response_mask], atol=1e-5, rtol=1e-5)


def test_the_packed_forward_is_differentiable(tiny_models):
    lm = AutoModelForCausalLM.from_pretrained(tiny_models["llama"][0], dtype=torch.float32)
    ids, mask, _ = _padded_batch(lm.config.vocab_size)
    packing.packed_hidden(backbone_of(lm), ids, mask).pow(2).sum().backward()
    packed_grad = lm.model.embed_tokens.weight.grad.clone()
    lm.zero_grad()
    hidden = final_hidden(backbone_of(lm), ids, mask)
    hidden[mask.bool()].pow(2).sum().backward()
    padded_grad = lm.model.embed_tokens.weight.grad
    # the same sums in another order: equal up to float32 rounding of the largest terms
    torch.testing.assert_close(packed_grad, padded_grad, atol=1e-4 * float(padded_grad.abs().max()), rtol=1e-3)
    assert padded_grad.abs().max() > 0


def test_an_attention_that_ignores_the_boundaries_is_refused(tiny_models, monkeypatch):
    """An attention path that does not split the packed row (here: transformers' detection of packed sequences
    turned off) lets one sequence attend to the previous: the start-up check catches it."""
    import transformers.masking_utils as masking_utils

    lm = AutoModelForCausalLM.from_pretrained(tiny_models["llama"][0], dtype=torch.float32)
    assert packing.refusal(lm, backbone_of(lm)) is None
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    assert "does not keep packed sequences apart" in packing.refusal(lm, backbone_of(lm))
    with pytest.warns(UserWarning, match="padding_free: llama is run on trimmed micro-batches"):
        assert packing.use_packing(True, lm, backbone_of(lm)) is False


def test_models_with_state_along_the_sequence_are_refused(tiny_models):
    lm = AutoModelForCausalLM.from_pretrained(tiny_models["llama"][0], dtype=torch.float32)
    lm.config.layer_types = ["linear_attention", "full_attention"]  # as Qwen3-Next's hybrid layers
    assert "linear_attention" in packing.refusal(lm, backbone_of(lm))
    lm.config.layer_types = None
    lm.config.model_type = "qwen3_next"
    assert "qwen3_next" in packing.refusal(lm, backbone_of(lm))


def test_auto_packs_only_where_the_attention_is_varlen(tiny_models, monkeypatch):
    lm = AutoModelForCausalLM.from_pretrained(tiny_models["llama"][0], dtype=torch.float32)
    backbone = backbone_of(lm)
    assert packing.use_packing(None, lm, backbone) is False  # sdpa on a CPU: a block mask, not varlen
    assert packing.use_packing(True, lm, backbone) is True
    assert packing.use_packing(False, lm, backbone) is False
    checked = []
    monkeypatch.setattr(packing, "refusal", lambda model, backbone: checked.append(model) or None)
    lm.config._attn_implementation = "flash_attention_2"  # as loaded with flash-attn on CUDA (not run here)
    assert packing.use_packing(None, lm, backbone) is True and checked == [lm]  # checked before it is used
