import pytest
import torch
from transformers import AutoModelForCausalLM

import fastppo.engines.hf as rollout
from fastppo.data import tokenize_prompts
from fastppo.engines.hf import generate, sample_next, static_cache
from tests.tiny_models import build_tokenizer


def test_greedy_generation_is_independent_of_padding(tiny_models):
    """A prompt generates the same greedy response alone and in a left-padded batch (KV cache + positions)."""
    tokenizer = build_tokenizer()
    for arch in ("llama", "gpt2"):
        lm = AutoModelForCausalLM.from_pretrained(tiny_models[arch][0], dtype=torch.float32)
        ids, mask = tokenize_prompts(["w1 w2 w3 w4 w5", "w6"], tokenizer, max_length=8)  # BOS w6: 2 tokens
        batch_ids, batch_mask, *_ = generate(lm, tokenizer, ids, mask, max_new_tokens=6, temperature=0)
        alone_ids, alone_mask, *_ = generate(
            lm, tokenizer, ids[1:, -2:], mask[1:, -2:], max_new_tokens=6, temperature=0
        )
        n = int(alone_mask.sum())
        assert batch_ids[1, :n].tolist() == alone_ids[0, :n].tolist(), arch


def test_the_static_cache_hands_attention_its_filled_prefix_only(tiny_models, monkeypatch):
    """Each step's attention gets the keys written so far, not the preallocated buffer (whose tail the mask hid),
    and the decode equals the one over transformers' growing DynamicCache."""
    tokenizer = build_tokenizer()
    lm = AutoModelForCausalLM.from_pretrained(tiny_models["llama"][0], dtype=torch.float32)
    ids, mask = tokenize_prompts(["w1 w2 w3 w4 w5", "w6"], tokenizer, max_length=8)
    cache = static_cache(lm, ids.shape[1] + 4)
    seen = []
    update = type(cache.layers[0]).update

    def recording_update(layer, *args, **kwargs):
        keys, values = update(layer, *args, **kwargs)
        seen.append(keys.shape[2])
        return keys, values

    monkeypatch.setattr(type(cache.layers[0]), "update", recording_update)  # every full-attention layer's class
    kv = {rollout._cache_name(lm.model): cache}  # `cache` in newer transformers, `past_key_values` in older
    with torch.no_grad():
        out = lm.model(input_ids=ids, attention_mask=mask, use_cache=True, **kv)
        step = lm.model(
            input_ids=ids[:, -1:],
            attention_mask=torch.cat([mask, mask[:, -1:]], 1),
            position_ids=mask.sum(-1, keepdim=True),
            use_cache=True,
            **kv,
        )
    assert seen[:: len(cache.layers)] == [ids.shape[1], ids.shape[1] + 1] and out.last_hidden_state.isfinite().all()
    assert step.last_hidden_state.isfinite().all()

    static = generate(lm, tokenizer, ids, mask, max_new_tokens=6, temperature=0)
    monkeypatch.setattr(rollout, "static_cache", lambda *args: None)  # transformers' DynamicCache instead
    dynamic = generate(lm, tokenizer, ids, mask, max_new_tokens=6, temperature=0)
    assert torch.equal(static.response_ids, dynamic.response_ids)


def test_eos_ends_a_row_and_masks_the_rest(tiny_models):
    """Row 0 emits EOS at once, row 1 at its third token: masks cover each response through its EOS only."""
    tokenizer = build_tokenizer()
    lm = AutoModelForCausalLM.from_pretrained(tiny_models["llama"][0], dtype=torch.float32)
    head_forward, calls = lm.lm_head.forward, []

    def forward_with_eos(hidden):  # (B, H) -> logits with EOS forced where the test wants it
        logits = head_forward(hidden)
        calls.append(1)
        force = torch.tensor([True, len(calls) >= 3])[-len(hidden) :]  # row 0 leaves the decode once it has ended
        logits[force, ..., tokenizer.eos_token_id] = 1e4
        return logits

    lm.lm_head.forward = forward_with_eos
    ids, mask = tokenize_prompts(["w1", "w2 w3"], tokenizer, max_length=8)
    response_ids, response_mask, ended, *_ = generate(lm, tokenizer, ids, mask, max_new_tokens=6, temperature=1.0)
    assert ended.tolist() == [True, True]
    assert response_mask.tolist() == [[1, 0, 0], [1, 1, 1]]
    assert response_ids[0].tolist() == [tokenizer.eos_token_id] + [tokenizer.pad_token_id] * 2
    assert response_ids[1, 2].item() == tokenizer.eos_token_id and tokenizer.eos_token_id not in response_ids[1, :2]


def test_top_k_and_top_p_restrict_the_support():
    torch.manual_seed(0)
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(2000, 1)
    top_k, logprobs = sample_next(logits, 1.0, top_k=2, top_p=1.0)
    assert logprobs is None  # a truncated draw: the caller computes the full distribution's log-probs
    assert set(top_k.tolist()) == {0, 1}
    probs = logits[0].softmax(-1)  # 0.64, 0.23, 0.09, ...: top_p 0.8 keeps the first two
    top_p, _ = sample_next(logits, 1.0, top_k=0, top_p=0.8)
    assert set(top_p.tolist()) == {0, 1} and probs[:2].sum() > 0.8
    assert sample_next(logits[:1], 0.0, 0, 1.0)[0].item() == 0


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, -1)  # 4000 rows: 4000 independent draws per call
    torch.manual_seed(0)
    draws = torch.cat([sample_next(logits, 1.0, 0, 1.0)[0] for _ in range(5)])
    frequencies = torch.bincount(draws, minlength=5).float() / draws.numel()
    assert frequencies[1] == 0  # probability 0 is never drawn
    torch.testing.assert_close(frequencies, probs, atol=0.01, rtol=0)  # 4.5 sigma at n = 20000
    hot, logprobs = sample_next(torch.tensor([[0.0, 2.0, 0.0]]).expand(20000, -1), 0.5, 0, 1.0)  # sharpened
    expected = torch.tensor([0.0, 4.0, 0.0]).softmax(-1)[1]
    assert abs((hot == 1).float().mean() - expected) < 0.01
    torch.testing.assert_close(logprobs, torch.tensor([0.0, 4.0, 0.0]).log_softmax(-1)[hot])  # at the temperature


@pytest.mark.parametrize(
    "arch, lean", [("llama", True), ("llama", False), ("qwen2", True), ("gpt2", False), ("gpt_neox", False)]
)
def test_finished_rows_leave_the_decode_without_changing_the_running_ones(tiny_models, monkeypatch, arch, lean):
    """With a fixed seed, the rows draw the same tokens, log-probs and values whether finished rows stay in the
    decode to the end (today's decode), leave it as soon as one ends, or at the default fraction: the running rows'
    KV cache, positions, masks and random draws do not depend on the rows that left."""
    tokenizer = build_tokenizer()
    lm = AutoModelForCausalLM.from_pretrained(tiny_models[arch][0], dtype=torch.float32).eval()
    if not lean:
        monkeypatch.setattr(rollout.LeanDecoder, "build", classmethod(lambda cls, lm, cache, rows, dtype=None: None))
    value_head = torch.nn.Linear(lm.config.hidden_size, 1)
    prompts = ["w1 w2 w3 w4 w5", "w6", "w7 w8", "w2", "w3 w4 w5", "w9 w1", "w5", "w8 w8 w8"]  # left-padded
    ids, mask = tokenize_prompts(prompts, tokenizer, max_length=8)
    end_ids = list(range(4, len(tokenizer), 6))  # a sixth of the vocabulary ends a row: lengths from 1 to 24

    def decode(leave_fraction, **sampling):
        monkeypatch.setattr(rollout, "LEAVE_FRACTION", leave_fraction)
        torch.manual_seed(0)
        options = {"value_head": value_head, "with_logprobs": True, **sampling}
        return generate(lm, tokenizer, ids, mask, max_new_tokens=24, end_ids=end_ids, **options)

    for sampling in ({"temperature": 1.0}, {"temperature": 0.8, "top_k": 5}, {"temperature": 0}):
        stay, every_end, default = decode(2.0, **sampling), decode(1e-9, **sampling), decode(0.25, **sampling)
        lengths = stay.response_mask.sum(-1)
        assert lengths.min() < stay.response_mask.shape[1] / 2 and lengths.unique().numel() > 2, lengths  # it ran
        for left in (every_end, default):
            assert torch.equal(left.response_ids, stay.response_ids), (arch, sampling)
            assert torch.equal(left.response_mask, stay.response_mask) and torch.equal(left.ended, stay.ended)
            real = stay.response_mask.bool()  # after a row's end its log-probs and values are nobody's
            torch.testing.assert_close(left.logprobs[real], stay.logprobs[real], rtol=0, atol=1e-5)
            torch.testing.assert_close(left.values[real], stay.values[real], rtol=0, atol=1e-5)


def test_finished_rows_leave_the_decode(tiny_models, monkeypatch):
    """The steps after rows end run on the running rows only (the point of leaving)."""
    tokenizer = build_tokenizer()
    lm = AutoModelForCausalLM.from_pretrained(tiny_models["llama"][0], dtype=torch.float32).eval()
    head_forward, rows_per_step = lm.lm_head.forward, []

    def forward_with_eos(hidden):  # row r of 4 ends at its (r + 1)-th token
        logits = head_forward(hidden)
        rows_per_step.append(len(hidden))
        step = len(rows_per_step) - 1
        ending = torch.tensor([r == step for r in range(4)])[-len(hidden) :]
        logits[ending, tokenizer.eos_token_id] = 1e4
        logits[~ending, tokenizer.eos_token_id] = -1e4
        return logits

    lm.lm_head.forward = forward_with_eos
    ids, mask = tokenize_prompts(["w1", "w2 w3", "w4", "w5 w6 w7"], tokenizer, max_length=8)
    generation = generate(lm, tokenizer, ids, mask, max_new_tokens=8, temperature=1.0)
    assert generation.response_mask.sum(-1).tolist() == [1, 2, 3, 4]
    assert rows_per_step == [4, 3, 2, 1] and generation.decoded_tokens == 10  # what perf/rollout_real_frac counts


@pytest.mark.parametrize("arch, lean", [("llama", True), ("llama", False), ("gpt2", False)])
def test_under_bf16_autocast_the_decode_multiplies_in_bf16(tiny_models, monkeypatch, arch, lean):
    """precision: bf16 on a CPU: the decode's linear layers multiply bf16 copies of their weights (the prefill under
    the caller's autocast), so its log-probs are the bf16 model's: near the model's own forward under bf16 autocast
    over the sampled tokens, and not float32's."""
    from fastppo.models import reference_logprobs

    tokenizer = build_tokenizer()
    lm = AutoModelForCausalLM.from_pretrained(tiny_models[arch][0], dtype=torch.float32).eval()
    if not lean:
        monkeypatch.setattr(rollout.LeanDecoder, "build", classmethod(lambda cls, lm, cache, rows, dtype=None: None))
    dtypes = []
    decode_linear = rollout.DecodeLinear
    monkeypatch.setattr(rollout, "DecodeLinear", lambda *args: dtypes.append(args[-1]) or decode_linear(*args))
    ids, mask = tokenize_prompts(["w1 w2 w3 w4 w5", "w6", "w7 w8"], tokenizer, max_length=8)

    def decode():
        torch.manual_seed(0)
        return generate(lm, tokenizer, ids, mask, max_new_tokens=8, end_ids=[], with_logprobs=True)

    float32 = decode()
    assert set(dtypes) == {torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = decode()
        input_ids = torch.cat([ids, bf16.response_ids], 1)
        attention_mask = torch.cat([mask, bf16.response_mask], 1)
        forward = reference_logprobs(lm, input_ids, attention_mask, ids.shape[1], 1.0, fused=False)
    assert dtypes[-1] == torch.bfloat16 and bf16.logprobs.dtype == torch.float32
    torch.testing.assert_close(bf16.logprobs, forward, atol=0.1, rtol=0)
    same = torch.equal(bf16.response_ids, float32.response_ids)
    assert not same or (bf16.logprobs - float32.logprobs).abs().max() > 1e-4  # rounded to bf16, not float32
