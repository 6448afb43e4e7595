from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from fastppo.models import score_at_last_token
from fastppo.ppo.config import PPOConfig
from fastppo.ppo.rewards import FunctionReward, ModelReward, RewardError, load_reward
from fastppo.runtime.errors import InputError
from fastppo.stages.common import pad_batch
from fastppo.stages.reward_model import score_tokens
from tests.tiny_models import build_tokenizer


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
