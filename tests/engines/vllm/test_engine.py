"""VLLMEngine against fastppo's own decode loop (the reference semantics) and the trainer's log-probs."""

from __future__ import annotations

import pytest
import torch

from fastppo.data import tokenize_prompts
from fastppo.engines.hf import end_token_ids, generate
from fastppo.engines.vllm import VLLMEngine, policy_weights
from fastppo.models import position_ids_for
from fastppo.ops import reference
from tests.engines.vllm.conftest import HAVE_VLLM, load_lm
from tests.tiny_models import build_tokenizer, prompt_list

pytestmark = pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed here: run .ci/vllm_tests.sh")
PROMPTS = prompt_list(6, seed=3)


@pytest.fixture(scope="module")
def engine(vllm_policy):
    return VLLMEngine(vllm_policy[0], None, torch.device("cpu"), seed=0, max_model_len=64)


@pytest.fixture(scope="module")
def lm(vllm_policy):
    return load_lm(vllm_policy[0])


def prompts(tokenizer):
    return tokenize_prompts(PROMPTS, tokenizer, max_length=16)


def trainer_logprobs(lm, prompt_ids, prompt_mask, response_ids, response_mask, temperature):
    """(B, T) log-probs of the response tokens through a full forward, as the trainer computes old log-probs."""
    ids = torch.cat([prompt_ids, response_ids], 1)
    mask = torch.cat([prompt_mask, response_mask], 1)
    with torch.no_grad():
        logits = lm(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask)).logits
    P = prompt_ids.shape[1]
    logits = logits[:, P - 1 : -1]
    return reference.token_logprobs(logits.double(), response_ids, temperature).float() * response_mask


def test_greedy_matches_the_hf_engine_with_end_ids_and_stop_strings(engine, lm):
    """Greedy rollouts of both engines: the same ids, masks and ended flags, when rows end at an end id (kept as the
    last token), at a stop string (the token completing it kept), or at max_new_tokens (truncated)."""
    tokenizer = build_tokenizer()
    ids, mask = prompts(tokenizer)
    free, *_ = generate(lm, tokenizer, ids, mask, 8, temperature=0, end_ids=[])  # no end: where rows would go
    end_id = int(free[0, 2])  # row 0 ends at its third token (and any other row that emits it)
    stop = tokenizer.decode(free[1, 1:2])  # row 1's second token, as text: a stop string
    end_ids = end_token_ids(tokenizer, lm, (end_id,))
    hf = generate(lm, tokenizer, ids, mask, 8, 0.0, 0, 1.0, (stop,), end_ids)
    ours = engine.generate(ids, mask, 8, 0.0, 0, 1.0, (stop,), end_ids, tokenizer.pad_token_id)
    for name, expected, actual in zip(("response_ids", "response_mask", "ended"), hf[:3], ours[:3], strict=True):
        assert torch.equal(expected, actual), f"{name}:\nhf   {expected.tolist()}\nvllm {actual.tolist()}"
    assert bool(hf[2][0]) and bool(hf[2][1]) and not bool(hf[2].all()), "the cases: end id, stop string, truncated"


def test_sampler_logprobs_match_the_trainer(engine, lm):
    tokenizer = build_tokenizer()
    ids, mask = prompts(tokenizer)
    for temperature in (1.0, 0.7):
        torch.manual_seed(1)
        response_ids, response_mask, _, sampler = engine.generate(ids, mask, 10, temperature, pad_id=0)
        expected = trainer_logprobs(lm, ids, mask, response_ids, response_mask, temperature)
        assert response_mask.sum() > 20
        assert torch.allclose(sampler * response_mask, expected, atol=1e-4), (sampler - expected).abs().max()


def test_seeds_come_from_the_run_rng(engine):
    tokenizer = build_tokenizer()
    ids, mask = prompts(tokenizer)
    torch.manual_seed(5)
    first = engine.generate(ids, mask, 10, 1.0, pad_id=0)
    torch.manual_seed(5)
    again = engine.generate(ids, mask, 10, 1.0, pad_id=0)
    other = engine.generate(ids, mask, 10, 1.0, pad_id=0)
    assert torch.equal(first[0], again[0]) and torch.equal(first[3], again[3])
    assert not torch.equal(first[0], other[0])


def test_weight_sync_changes_what_the_engine_samples_from(engine, lm):
    """After a sync the sampler's log-probs are the new weights' (a changed lm_head and layer), not the old ones;
    syncing the old weights back restores them (and the prefix cache does not serve stale KV)."""
    tokenizer = build_tokenizer()
    ids, mask = prompts(tokenizer)
    changed = load_lm(engine.llm.llm_engine.model_config.model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in (changed.lm_head.weight, changed.model.layers[0].mlp.up_proj.weight):
            p.add_(torch.randn_like(p) * 0.5)
    try:
        seconds = engine.sync_weights(policy_weights(changed))
        assert seconds < 5
        response_ids, response_mask, _, sampler = engine.generate(ids, mask, 10, 1.0, pad_id=0)
        new = trainer_logprobs(changed, ids, mask, response_ids, response_mask, 1.0)
        old = trainer_logprobs(lm, ids, mask, response_ids, response_mask, 1.0)
        assert torch.allclose(sampler * response_mask, new, atol=1e-4), (sampler - new).abs().max()
        assert (old - new).abs().max() > 0.1
    finally:
        engine.sync_weights(policy_weights(lm))
    response_ids, response_mask, _, sampler = engine.generate(ids, mask, 10, 1.0, pad_id=0)
    restored = trainer_logprobs(lm, ids, mask, response_ids, response_mask, 1.0)
    assert torch.allclose(sampler * response_mask, restored, atol=1e-4)


def test_lora_weights_are_merged_and_named_as_transformers_does(lm):
    """policy_weights of a LoRA policy: transformers' names, the adapters merged in, and the model left unmerged."""
    import copy

    from fastppo.models import add_lora

    plain = dict(policy_weights(lm))
    peft = add_lora(copy.deepcopy(lm), rank=4, alpha=8.0)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    merged = {k: v.clone() for k, v in policy_weights(peft)}
    assert set(merged) == set(plain)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(merged[name], plain[name])  # the adapter is in
    base = peft.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.allclose(base, plain[name], atol=1e-6)  # and out again afterwards


def test_the_host_process_is_left_as_it_was(engine):
    """vLLM replaced torch.set_num_threads with a no-op and put its allocator in LD_PRELOAD: both undone."""
    import os

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert "libtcmalloc" not in os.environ.get("LD_PRELOAD", "")
    assert hasattr(engine._driver_model(), "load_weights")  # the CUDA sync path's model is where TRL finds it
