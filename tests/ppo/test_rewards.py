import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from fastppo.models import score_at_last_token
from fastppo.ppo.config import PPOConfig
from fastppo.ppo.rewards import FunctionReward, ModelReward, RewardError, Rewards, load_reward
from fastppo.runtime.errors import InputError
from fastppo.stages.common import pad_batch
from fastppo.stages.reward_model import score_tokens
from tests.tiny_models import WORDS, build_tokenizer, prompt_list, save_reward_model, small_config


def fake_batch(prompts, responses):
    tokenizer = build_tokenizer()
    from fastppo.data import tokenize_prompts

    prompt_ids, prompt_mask = tokenize_prompts(prompts, tokenizer, 16)
    rows = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in responses]
    width = max(len(r) for r in rows)
    response_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    response_mask = torch.zeros_like(response_ids)
    for i, r in enumerate(rows):
        response_ids[i, : len(r)], response_mask[i, : len(r)] = torch.tensor(r), 1
    return SimpleNamespace(
        prompts=prompts,
        responses=responses,
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        ended=torch.zeros(len(prompts), dtype=torch.bool),
    )


@pytest.mark.parametrize(
    "fn, message",
    [
        (lambda p, r: [1.0], "returned 1 scores for 2"),
        (lambda p, r: [1.0, float("nan")], "non-finite"),
        (lambda p, r: 1 / 0, "raised ZeroDivisionError"),
        (lambda p, r: ["a", "b"], "must return numbers"),
    ],
)
def test_bad_reward_functions_are_reported(fn, message):
    with pytest.raises(RewardError, match=message):
        FunctionReward(fn)(fake_batch(["w1", "w2"], ["w3", "w4 w5"]))


def exits(code):
    def reward(prompts, responses):
        raise SystemExit(code)  # what sys.exit(code) does

    return reward


@pytest.mark.parametrize("timeout", [None, 5.0], ids=["main-thread", "worker-thread"])
@pytest.mark.parametrize("code", [0, 3])
def test_a_reward_calling_sys_exit_is_the_rewards_failure(timeout, code):
    """sys.exit() inside a reward would end the run with its code (0 included), mid-step, without a word."""
    with pytest.raises(RewardError, match=rf"reward function .*reward called sys.exit\({code}\)"):
        FunctionReward(exits(code), timeout=timeout)(fake_batch(["w1", "w2"], ["w3", "w4 w5"]))


def test_scores_of_another_shape_are_refused_not_flattened():
    """Four responses scored as [[a, b], [c, d]]: flattened, they would pair scores with the wrong responses."""
    batch = fake_batch(["w1", "w2", "w3", "w4"], ["w5", "w6", "w7", "w8"])
    with pytest.raises(RewardError, match=r"shape \(2, 2\) for 4 responses"):
        FunctionReward(lambda p, r: [[1.0, 2.0], [3.0, 4.0]])(batch)
    assert FunctionReward(lambda p, r: [1.0, 2.0, 3.0, 4.0])(batch).tolist() == [1.0, 2.0, 3.0, 4.0]


def test_module_function_spec(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def length(prompts, responses):\n    return [len(r) for r in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = load_reward("my_rewards:length", PPOConfig(), build_tokenizer(), torch.device("cpu"))
    assert reward(fake_batch(["w1", "w2"], ["w3", "w4 w5"])).tolist() == [2.0, 5.0]
    with pytest.raises(InputError, match="no function"):
        load_reward("my_rewards:missing", PPOConfig(), build_tokenizer(), torch.device("cpu"))


def test_model_reward_same_scores_from_ids_and_from_text(tiny_models):
    """With the policy's vocabulary the ids are scored directly; re-tokenizing the text must agree."""
    path = tiny_models["llama"][1]
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    batch = fake_batch(["w1 w2", "w3"], [" w4 w5 w6", " w7"])
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None  # with a template of its own, the reward model would see the rendered chat
    direct = ModelReward(model, tokenizer, tokenizer)
    assert direct.same_vocab
    retokenize = ModelReward(model, tokenizer, tokenizer)
    retokenize.same_vocab = False
    torch.testing.assert_close(direct(batch), retokenize(batch))
    alone = ModelReward(model, tokenizer, tokenizer)(fake_batch(["w3"], [" w7"]))
    torch.testing.assert_close(direct(batch)[1:], alone)  # padding does not change a score


def test_model_reward_scores_rows_of_similar_length_together_and_returns_them_in_order(tiny_models):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["llama"][1], dtype=torch.float32)
    tokenizer = build_tokenizer()
    prompts, responses = ["w1 w2", "w3", "w1", "w2 w3 w4"], [" w4 w5 w6 w7 w8 w9", " w7", " w5 w6", " w8"]
    batch = fake_batch(prompts, responses)
    whole = ModelReward(model, tokenizer, tokenizer)
    expected = whole(batch)
    assert whole.real_frac < 1.0  # one forward as wide as the longest row
    chunked = ModelReward(model, tokenizer, tokenizer, rows_per_forward=2)
    torch.testing.assert_close(chunked(batch), expected)
    assert whole.real_frac < chunked.real_frac <= 1.0
    budget = ModelReward(
        model, tokenizer, tokenizer, rows_per_forward=4, tokens_per_forward=10
    )  # rows of 3+4, 5, 9 tokens
    torch.testing.assert_close(budget(batch), expected)
    assert chunked.real_frac < budget.real_frac <= 1.0
    one = ModelReward(model, tokenizer, tokenizer)
    alone = [one(fake_batch([p], [r])) for p, r in zip(prompts, responses, strict=True)]
    torch.testing.assert_close(torch.cat(alone), expected)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_packed_reward_model_scores_what_the_padded_one_scores(tiny_models, tmp_path, arch):
    """padding_free: true: the reward model's forwards run over the real tokens packed into one row, the same scores."""
    tokenizer = build_tokenizer()
    prompts, responses = ["w1 w2", "w3", "w1", "w2 w3 w4"], [" w4 w5 w6 w7 w8 w9", " w7", " w5 w6", " w8"]
    scores = {}
    for padding_free in (False, True):
        config = small_config(tmp_path, reward_model=tiny_models[arch][1], padding_free=padding_free, device="cpu")
        reward = load_reward(config.reward_model, config, tokenizer, torch.device("cpu"))
        assert reward.packed is padding_free
        scores[padding_free] = reward(fake_batch(prompts, responses))
    torch.testing.assert_close(scores[True], scores[False], atol=1e-5, rtol=1e-5)


def test_reward_training_and_ppo_read_the_same_token_when_pad_is_eos(tiny_llama):
    """pad == EOS: `fastppo reward-model` and PPO both read each row at its last attended token, the response's EOS,
    whatever the padding; Hugging Face's own pooling (the last non-pad id) would read the token before it."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama[1], dtype=torch.float32).eval()
    tokenizer = build_tokenizer()
    eos = tokenizer.eos_token_id
    model.config.pad_token_id = eos
    rows = [tokenizer("w1 w2 w3")["input_ids"] + [eos], tokenizer("w4")["input_ids"] + [eos]]
    with torch.no_grad():
        batched = score_tokens(model, rows, pad_id=eos)
        alone = torch.cat([score_tokens(model, [row], pad_id=eos) for row in rows])
        input_ids, attention_mask = pad_batch(rows, eos)
        ppo = score_at_last_token(model, input_ids, attention_mask)
        hf_pooling = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
    torch.testing.assert_close(batched, alone)
    torch.testing.assert_close(ppo, batched)
    assert not torch.allclose(hf_pooling, batched)  # the case this guards against is really different here


# --- a reward model object scores with its own tokenizer ----------------------------------------------------------

# Other vocabularies than the policy's (97 tokens): the same words at other ids, one larger and one smaller.
LARGER_VOCABULARY = [*reversed(WORDS), *(f"x{i}" for i in range(40))]  # 137 tokens
SMALLER_VOCABULARY = list(reversed(WORDS[:60]))  # 67 tokens: the policy's ids above 66 are beyond its embeddings


@pytest.fixture(scope="module")
def other_reward_models(tmp_path_factory):
    """gpt2 classifiers (the policy is a llama) with tokenizers of their own, larger and smaller than the policy's."""
    directory = tmp_path_factory.mktemp("other-rewards")
    return {
        "larger": save_reward_model(directory, "gpt2", LARGER_VOCABULARY),
        "smaller": save_reward_model(directory, "gpt2", SMALLER_VOCABULARY),
    }


def chat_batch():
    from fastppo.data import read_prompts

    tokenizer = build_tokenizer()
    prompts = read_prompts([[{"role": "user", "content": "w1 w2 w3"}], "w5 w80", "w70 w71 w72 w73"], tokenizer)
    batch = fake_batch(prompts, ["w7 w8", "w81 w9 w10", "w11"])
    batch.ended = torch.tensor([True, False, True])
    return batch


def test_a_reward_model_object_takes_the_tokenizer_it_is_given(other_reward_models, tiny_llama):
    path = other_reward_models["larger"]
    config, cpu, batch = PPOConfig(), torch.device("cpu"), chat_batch()
    from transformers import AutoConfig, AutoTokenizer

    expected = load_reward(path, config, build_tokenizer(), cpu)(batch)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    model.name_or_path = ""  # built in memory: no directory to find a tokenizer in
    with pytest.raises(
        InputError, match=r"no tokenizer to be found .* vocabulary \(137 embeddings\) is not the policy"
    ):
        load_reward(model, config, build_tokenizer(), cpu, policy=tiny_llama[0])
    given = load_reward(
        model, config, build_tokenizer(), cpu, AutoTokenizer.from_pretrained(path), policy=tiny_llama[0]
    )
    torch.testing.assert_close(given(batch), expected, rtol=0, atol=1e-6)
    # ... or its path, as the reward_tokenizer field
    with_field = PPOConfig(reward_tokenizer=path)
    assert load_reward(model, with_field, build_tokenizer(), cpu, path, policy=tiny_llama[0]).same_vocab is False
    # the policy's vocabulary size and no tokenizer: the policy's, a model of its family
    same = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(tiny_llama[1]))
    assert load_reward(same, config, build_tokenizer(), cpu, policy=tiny_llama[0]).same_vocab
    with pytest.raises(InputError, match="its tokenizer has 137 tokens and the model 97 embeddings"):
        load_reward(same, config, build_tokenizer(), cpu, AutoTokenizer.from_pretrained(path), policy=tiny_llama[0])


def test_the_trainer_takes_a_reward_model_object_with_its_tokenizer(other_reward_models, tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    from fastppo import PPOTrainer

    path = other_reward_models["smaller"]
    model = AutoModelForSequenceClassification.from_pretrained(path)
    model.name_or_path = ""
    config = small_config(tmp_path, policy_model=tiny_llama[0], steps=1)
    trainer = PPOTrainer(
        config, reward=model, reward_tokenizer=AutoTokenizer.from_pretrained(path), prompts=prompt_list()
    )
    assert trainer.reward.rewards[0].tokenizer.vocab_size == 67 and math.isfinite(trainer.step()["reward/score_mean"])


# --- several rewards, weighted -------------------------------------------------------------------------------------


def test_rewards_are_weighted_and_none_does_not_count():
    """TRL's semantics: None from a function means it does not apply to that response; the weighted sum (nansum)
    leaves it out, and its mean is taken over the responses it scored."""

    def half(completions, **kwargs):
        return [1.0 if i % 2 else None for i in range(len(completions))]

    def length(prompts, responses):
        return [float(len(r.split())) for r in responses]

    rewards = Rewards([FunctionReward(half), FunctionReward(length), FunctionReward(lambda p, r: [0.5] * len(r))])
    rewards.weights = torch.tensor([2.0, 1.0, -1.0])
    batch = fake_batch(["w1", "w2", "w3"], ["w4", "w5 w6", "w7 w8 w9"])
    scores = rewards(batch)
    assert scores[:, 0].isnan().tolist() == [True, False, True]
    assert rewards.combine(scores).tolist() == [0.5, 3.5, 2.5]
    stats = rewards.stats(scores)
    assert stats["rewards/half/mean"] == 1.0 and stats["rewards/length/mean"] == 2.0
    assert set(stats) == {f"rewards/{n}/{s}" for n in ("half", "length", "<lambda>") for s in ("mean", "std")}
    with pytest.warns(UserWarning, match="no reward applies to 1 response"):
        Rewards([FunctionReward(half)]).combine(Rewards([FunctionReward(half)])(fake_batch(["w1"], ["w2"])))
    with pytest.raises(RewardError, match="non-finite scores at positions \\[1\\]"):
        FunctionReward(lambda p, r: [None, float("nan")])(fake_batch(["w1", "w2"], ["w3", "w4"]))


def test_a_reward_model_with_a_short_context_scores_rows_longer_than_it(tmp_path):
    """A reward model with its own tokenizer re-renders prompt + response (its chat template adds tokens): a row can
    exceed its position table (GPT-2's, 128 here) even when max_prompt_length + max_new_tokens fit it. The row loses
    the start of its prompt instead of indexing past the table."""
    reward_path = save_reward_model(tmp_path, "gpt2", list(reversed(WORDS)))  # other ids, same words
    config = small_config(tmp_path, max_prompt_length=100, max_new_tokens=26)
    reward = load_reward(reward_path, config, build_tokenizer(), torch.device("cpu"))
    assert not reward.same_vocab
    prompt, response = " ".join(["w1"] * 100), " ".join(["w2"] * 26)
    batch = SimpleNamespace(prompts=[prompt], responses=[response], ended=torch.tensor([True]))
    assert len(reward.encode(prompt, response, True)) > 128
    assert torch.isfinite(reward(batch)).all()
