"""Checkpoints as they are released (bf16/fp16 weights, stock dropout, several end-of-turn ids, chat templates with
BOS, logit transforms) train the way a user expects: each test here failed before fastppo handled that property."""

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from fastppo import PPOTrainer
from fastppo.engines.hf import end_token_ids, generate
from fastppo.models import disable_dropout
from fastppo.ppo.rewards import ModelReward
from fastppo.runtime.errors import InputError
from tests.tiny_models import (
    END_OF_TURN,
    build_tokenizer,
    count_w7,
    logprobs_repeat_exactly,
    prompt_list,
    save_tiny_models,
    small_config,
)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    directory = tmp_path_factory.mktemp("released")
    return {
        "llama": save_tiny_models(directory, "llama"),  # bf16
        "llama_dropout": save_tiny_models(directory, "llama", attention_dropout=0.3),
        "opt": save_tiny_models(directory, "opt"),  # fp16, dropout 0.1 applied functionally
        "granite": save_tiny_models(directory, "granite"),  # logits / logits_scaling
    }


def saved_dtypes(path: str) -> set[str]:
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return {str(f.get_slice(name).get_dtype()) for name in f.keys()}


def test_bf16_checkpoint_trains_float32_master_weights_and_saves_bf16(released, tmp_path):
    policy, reward = released["llama"]
    assert saved_dtypes(policy) == {"BF16"}
    config = small_config(
        tmp_path,
        policy_model=policy,
        reward_model=reward,
        learning_rate=1e-6,
        steps=1,
        mini_batch_size=4,
        micro_batch_size=2,
        max_grad_norm=None,
    )
    trainer = PPOTrainer(config, prompts=prompt_list())
    optimized = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert {p.dtype for p in optimized} == {torch.float32}
    before = [p.detach().clone() for p in trainer.model.lm.parameters()]
    trainer.step()
    changed = sum(int((p.detach() != b).sum()) for p, b in zip(trainer.model.lm.parameters(), before, strict=True))
    total = sum(b.numel() for b in before)
    assert changed > 0.9 * total, f"only {changed / total:.1%} of the weights moved at lr 1e-6"
    norms = [p for n, p in trainer.model.lm.named_parameters() if "norm" in n]
    assert all(bool((p.detach() != 1).any()) for p in norms)  # norm weights move too

    saved = trainer.save()
    assert saved_dtypes(saved) == {"BF16"}  # the dtype the user started from
    assert json.load(open(os.path.join(saved, "config.json")))["dtype"] == "bfloat16"
    resumed = PPOTrainer(
        small_config(tmp_path, policy_model=policy, reward_model=reward, resume_from=saved), prompts=prompt_list()
    )
    for a, b in zip(resumed.model.lm.parameters(), trainer.model.lm.parameters(), strict=True):
        assert torch.equal(a, b)  # resumed from the float32 master weights, not the rounded bf16 ones


def test_save_dtype_overrides_the_checkpoint_dtype(released, tmp_path):
    policy, reward = released["llama"]
    config = small_config(tmp_path, policy_model=policy, reward_model=reward, steps=1, save_dtype="float32")
    trainer = PPOTrainer(config, prompts=prompt_list())
    trainer.train()
    saved = os.path.join(config.output_dir, "checkpoint-1")
    assert saved_dtypes(saved) == {"F32"}
    assert not os.path.exists(os.path.join(saved, "master_weights.safetensors"))  # the weights are the master


@pytest.mark.parametrize("model", ["opt", "llama_dropout"])
def test_no_dropout_anywhere_in_the_ppo_loop(released, tmp_path, model):
    policy, reward = released[model]
    config = small_config(
        tmp_path,
        policy_model=policy,
        reward_model=reward,
        steps=1,
        mini_batch_size=4,
        micro_batch_size=1,
        ppo_epochs=1,
        old_logprobs="recompute",
    )
    trainer = PPOTrainer(config, prompts=prompt_list())
    assert logprobs_repeat_exactly(trainer)

    metrics = trainer.step()  # one minibatch: the update sees exactly the rollout-time policy
    assert metrics["policy/ratio_max"] == 1.0 and metrics["policy/clip_frac"] == 0.0
    assert metrics["policy/approx_kl"] == 0.0
    assert metrics["policy/kl"] == 0.0  # against the reference, a float32 copy of the same weights


@pytest.mark.parametrize("model", ["llama", "llama_dropout", "opt", "granite", "qwen2", "gpt2", "gpt_neox"])
def test_the_decodes_logprobs_and_values_are_the_forwards(released, tiny_models, tmp_path, model):
    """old_logprobs: rollout keeps the log-probs and values the decode computed: they are the policy's forward
    over the batch (left-padded prompts, logit transforms, configs with dropout), up to float32 rounding."""
    policy, reward = released[model] if model in released else tiny_models[model]
    config = small_config(
        tmp_path,
        policy_model=policy,
        reward_model=reward,
        steps=1,
        rollout_batch_size=8,
        mini_batch_size=8,
        old_logprobs="rollout",
    )
    trainer = PPOTrainer(config, reward=None if reward else count_w7, prompts=prompt_list())  # granite: no RM
    batch = trainer.rollout(prompt_list()[:8])
    assert (batch.prompt_mask == 0).any() and batch.response_mask.sum() > 8  # left padding; several tokens a row
    with torch.no_grad():
        logprobs, _, values = trainer.model(batch.input_ids, batch.attention_mask, batch.prompt_ids.shape[1], 1.0)
    valid = batch.response_mask.bool()
    torch.testing.assert_close(batch.sampler_logprobs[valid], logprobs[valid], atol=1e-4, rtol=0)
    torch.testing.assert_close(batch.sampler_values[valid], values[valid], atol=1e-4, rtol=0)

    batch.scores = trainer.score(batch)
    trainer.compute_logprobs(batch)  # no second policy pass: the decode's tensors are the old ones
    assert batch.old_logprobs is batch.sampler_logprobs and batch.old_values is batch.sampler_values
    metrics = trainer.step()  # the first minibatch sees the rollout-time policy, to float32 rounding
    assert abs(metrics["policy/ratio_max"] - 1.0) < 1e-4 and metrics["policy/clip_frac"] == 0.0
    assert metrics["policy/kl"] < 1e-3  # against the reference, a float32 copy of the same weights


def test_old_logprobs_auto_reuses_the_decode_only_where_it_is_the_trainers_forward(released, tmp_path):
    policy, reward = released["llama"]
    cases = [
        ({}, True),
        ({"critic": "separate"}, False),
        ({"old_logprobs": "recompute"}, False),
        ({"precision": "bf16"}, False),
    ]  # the float32 decode is not a bf16 forward
    for overrides, expected in cases:
        config = small_config(tmp_path, policy_model=policy, reward_model=reward, **overrides)
        trainer = PPOTrainer(config, prompts=prompt_list())
        assert trainer.old_logprobs_from_rollout is expected, overrides
        batch = trainer.rollout(prompt_list()[:2])  # neither log-probs nor values computed for nobody
        assert (batch.sampler_values is not None) is expected and (batch.sampler_logprobs is not None) is expected


def test_bf16_precision_on_a_cpu_autocasts_the_forwards_and_recomputes_the_old_logprobs(released, tmp_path):
    """precision: bf16 on a CPU (fast only with AMX / AVX-512 BF16, but correct anywhere): the decode stays float32,
    the old log-probs, the reference's and the update's are bf16-autocast forwards, so the first minibatch's ratio
    is 1 up to their own rounding, and the log-probs are float32's to bf16 precision."""
    policy, reward = released["llama"]
    config = small_config(
        tmp_path,
        policy_model=policy,
        reward_model=reward,
        steps=1,
        rollout_batch_size=8,
        mini_batch_size=8,
        precision="bf16",
    )
    trainer = PPOTrainer(config, prompts=prompt_list())
    assert trainer.autocast_dtype == torch.bfloat16 and not trainer.old_logprobs_from_rollout
    batch = trainer.rollout(prompt_list()[:8])
    valid = batch.response_mask.bool()
    with torch.no_grad():
        plain = trainer.model(batch.input_ids, batch.attention_mask, batch.prompt_ids.shape[1], 1.0)[0]
        with trainer._autocast():
            autocast = trainer.model(batch.input_ids, batch.attention_mask, batch.prompt_ids.shape[1], 1.0)[0]
    assert autocast.dtype == torch.float32
    difference = (autocast - plain)[valid].abs().max()
    assert 0 < difference < 5e-2, difference  # bf16 matmuls ran (not float32), within bf16's rounding

    metrics = trainer.step()
    assert abs(metrics["policy/ratio_max"] - 1.0) < 1e-3 and metrics["policy/clip_frac"] == 0.0
    assert abs(metrics["policy/kl"]) < 1e-2 and math.isfinite(metrics["value/loss"])


def test_functional_dropout_attributes_are_zeroed(released):
    lm = AutoModelForCausalLM.from_pretrained(released["opt"][0], dtype=torch.float32)
    assert lm.config.dropout == 0.1
    disable_dropout(lm)
    lm.train()
    ids = torch.tensor([[3, 5, 6, 7, 8]])
    torch.testing.assert_close(lm(ids).logits, lm(ids).logits, rtol=0, atol=0)
    assert lm.config.dropout == 0.0


def test_lora_policy_object_with_a_quantized_copy_reference(released, tmp_path):
    """get_peft_model wraps the caller's model in place: the reference must still be the base weights."""
    policy, reward = released["llama"]
    lm = AutoModelForCausalLM.from_pretrained(policy)
    config = small_config(
        tmp_path, reward_model=reward, lora_rank=4, reference="copy", reference_quantization="8bit", steps=1
    )
    trainer = PPOTrainer(config, policy=lm, tokenizer=build_tokenizer(), prompts=prompt_list())
    assert any("Linear8bitLt" in type(m).__name__ for m in trainer.reference.modules())
    metrics = trainer.step()
    assert abs(metrics["policy/kl"]) < 0.05, metrics["policy/kl"]  # 8-bit rounding only; random weights: > 1


def test_reference_object_is_quantized_when_asked(released, tmp_path):
    policy, reward = released["llama"]
    reference = AutoModelForCausalLM.from_pretrained(policy)
    config = small_config(tmp_path, policy_model=policy, reward_model=reward, reference_quantization="4bit")
    trainer = PPOTrainer(config, prompts=prompt_list(), reference=reference)
    assert any("Linear4bit" in type(m).__name__ for m in trainer.reference.modules())


def force_tokens(lm, tokens: dict[int, int]):
    """Make the LM emit tokens[t] as the t-th generated token of every row (t = 0 is the prefill's)."""
    original = lm.lm_head.forward
    calls = {"n": 0}

    def forward(hidden):
        logits = original(hidden)
        if calls["n"] in tokens:
            logits[..., tokens[calls["n"]]] = 1e4  # the decode's logits: (B, V)
        calls["n"] += 1
        return logits

    lm.lm_head.forward = forward


def test_every_end_of_turn_id_ends_a_response(released):
    policy = released["llama"][0]
    tokenizer = build_tokenizer()
    lm = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    im_end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assert end_token_ids(tokenizer, lm) == sorted({tokenizer.eos_token_id, im_end})  # from generation_config.json
    assert end_token_ids(tokenizer, None, (42,)) == sorted({tokenizer.eos_token_id, 42})
    w1 = tokenizer.convert_tokens_to_ids("w1")
    force_tokens(lm, {0: w1, 1: w1, 2: im_end})
    ids, mask = torch.tensor([[3, 10, 11]]), torch.ones(1, 3, dtype=torch.long)
    response_ids, response_mask, ended, *_ = generate(lm, tokenizer, ids, mask, 8, end_ids=end_token_ids(tokenizer, lm))
    assert response_ids.shape[1] == 3 and response_ids[0, 2] == im_end and bool(ended[0])


def test_a_stop_string_ends_a_response_it_does_not_truncate_it(released, tmp_path):
    policy, _ = released["llama"]
    w1, w7 = build_tokenizer().convert_tokens_to_ids(["w1", "w7"])
    config = small_config(
        tmp_path, policy_model=policy, stop_strings=["w7"], missing_eos_penalty=100.0, max_new_tokens=6
    )
    trainer = PPOTrainer(config, prompts=prompt_list(), reward=count_w7)
    force_tokens(trainer.model.lm, {0: w1, 1: w7})
    batch = trainer.rollout(prompt_list()[:4])
    assert bool(batch.ended.all()) and not bool(batch.truncated.any())
    assert batch.response_mask.sum(-1).tolist() == [2, 2, 2, 2]
    trainer.score(batch)
    assert batch.scores.tolist() == [1.0, 1.0, 1.0, 1.0]  # no missing-EOS penalty: the response ended


def test_trainer_logprobs_follow_granite_logits_scaling(released, tmp_path):
    from fastppo.models import check_logprob_path

    policy, _ = released["granite"]
    lm = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    assert lm.config.logits_scaling == 8.0
    ids, mask = torch.tensor([[3, 10, 11, 12, 13, 14]]), torch.ones(1, 6, dtype=torch.long)
    for fused in (True, False):
        assert check_logprob_path(lm, ids, mask, fused, tolerance=1e-4) < 1e-4
    PPOTrainer(small_config(tmp_path, policy_model=policy), prompts=prompt_list(), reward=count_w7).step()


def test_an_unknown_logit_transform_stops_the_run_before_training(released, tmp_path):
    policy, reward = released["llama"]
    lm = AutoModelForCausalLM.from_pretrained(policy)
    original = lm.forward

    def forward(*args, **kwargs):  # an architecture fastppo does not know: scales its logits
        out = original(*args, **kwargs)
        out.logits = out.logits * 3.0
        return out

    lm.forward = forward
    with pytest.raises(InputError, match="LlamaForCausalLM.*differ from the model's own logits"):
        PPOTrainer(
            small_config(tmp_path, reward_model=reward), policy=lm, tokenizer=build_tokenizer(), prompts=prompt_list()
        )


def test_reward_model_with_its_own_tokenizer_sees_its_training_format(released):
    from fastppo.data import chat_prompt

    tokenizer = build_tokenizer()
    scorer = ModelReward.__new__(ModelReward)  # only its encoding is tested here
    scorer.tokenizer, scorer.max_length = tokenizer, 4096
    messages = [{"role": "user", "content": "w3 w4"}]
    prompt = chat_prompt(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), messages)
    ids = scorer.encode(prompt, "w5 w6", ended=True)
    # its template, one BOS, its end of turn after the response
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "<bos>",
        "user:",
        "w3",
        "w4",
        END_OF_TURN,
        "assistant:",
        "w5",
        "w6",
        END_OF_TURN,
    ]
    tokenizer.chat_template = None
    ids = scorer.encode("w3 w4", "w5 w6", ended=True)
    assert tokenizer.convert_ids_to_tokens(ids) == ["<bos>", "w3", "w4", "w5", "w6", "<eos>"]  # EOS kept
    assert scorer.encode("w3 w4", "w5 w6", ended=False)[-1] != tokenizer.eos_token_id  # truncated: no EOS


def test_reward_model_truncates_the_prompt_never_the_response(released):
    from transformers import AutoModelForSequenceClassification

    _, reward = released["llama"]
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    scorer = ModelReward(
        AutoModelForSequenceClassification.from_pretrained(reward, dtype=torch.float32),
        tokenizer,
        build_tokenizer(),
        max_length=4,
    )
    scorer.same_vocab = False
    seen = {}
    scorer._score = lambda input_ids, attention_mask: torch.zeros(len(seen.setdefault("ids", input_ids)))
    batch = SimpleNamespace(prompts=["w1 w2 w3 w4"], responses=["w5 w6"], ended=torch.tensor([True]))
    scorer(batch)
    assert tokenizer.convert_ids_to_tokens(seen["ids"][0].tolist()) == ["w4", "w5", "w6", "<eos>"]


def test_top_k_warns_that_it_is_off_policy(released, tmp_path):
    policy, reward = released["llama"]
    with pytest.warns(UserWarning, match="off-policy"):
        PPOTrainer(small_config(tmp_path, policy_model=policy, reward_model=reward, top_k=5), prompts=prompt_list())


def test_rng_state_round_trips_with_the_gaussian_caches():
    import random

    import numpy as np

    from fastppo.runtime.rng import rng_state as _rng_state
    from fastppo.runtime.rng import set_rng_state as _set_rng_state

    random.gauss(0, 1), np.random.standard_normal()  # leave a cached Gaussian in both
    state = _rng_state()
    expected = (random.gauss(0, 1), float(np.random.standard_normal()), torch.rand(1).item())
    _set_rng_state(state)
    assert (random.gauss(0, 1), float(np.random.standard_normal()), torch.rand(1).item()) == expected
