"""The advantage estimators (GAE and its VAPO additions, GRPO, Dr. GRPO, RLOO, REINFORCE++), KL placement, value
warm-up and DAPO's overlong penalty and dynamic sampling: the math on hand-made batches, then the trainer end to end
on tiny models."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch

from fastppo import PPOTrainer, ops
from fastppo.ppo.advantages import ADVANTAGE_ESTIMATORS, estimate_advantages, uses_critic
from fastppo.ppo.config import PPOConfig
from fastppo.ppo.groups import concat, repeat_each, varied_groups
from fastppo.ppo.shaping import overlong_penalties, shape_rewards
from fastppo.runtime.errors import InputError
from tests.tiny_models import count_w7, prompt_list, small_config

# ----------------------------------------------------------------------------------------------
# the math, on hand-made batches
# ----------------------------------------------------------------------------------------------


def shape_and_estimate(batch, config, kl_coef: float):
    """Steps 4 and 5 as the trainer runs them: (rewards, kl, advantages, returns)."""
    batch.rewards, kl = shape_rewards(batch, config, kl_coef)
    return (batch.rewards, kl, *estimate_advantages(batch, config))


def scored_batch(B=6, T=7, seed=0):
    """What steps 4 and 5 read: scores, masks (row 0 full, row 1 of length 1), log-probs, values."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0], lengths[1] = T, 1
    mask = (torch.arange(T) < lengths[:, None]).long()
    logprobs = -torch.rand(B, T, generator=g)
    return types.SimpleNamespace(
        scores=torch.randn(B, generator=g),
        response_mask=mask,
        old_logprobs=logprobs,
        ref_logprobs=logprobs + 0.1 * torch.randn(B, T, generator=g),
        old_values=torch.randn(B, T, generator=g),
    )


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_group_estimators_put_the_sequence_advantage_on_every_token(estimator):
    batch = scored_batch()
    config = PPOConfig(advantage_estimator=estimator, samples_per_prompt=3, kl_in_reward=False)
    rewards, kl, advantages, returns = shape_and_estimate(batch, config, kl_coef=0.3)
    expected = ops.group_advantages(batch.scores, 3, estimator)[:, None] * batch.response_mask
    torch.testing.assert_close(advantages, expected)
    assert returns is None and (kl != 0).any()  # the KL is still measured, just not in the reward
    assert torch.equal(rewards.sum(-1), ops.group_advantages(batch.scores, 3, estimator))


def test_kl_in_the_reward_adds_the_penalty_to_go():
    batch = scored_batch()
    config = PPOConfig(advantage_estimator="grpo", samples_per_prompt=3, gamma=0.9)
    _, kl, advantages, _ = shape_and_estimate(batch, config, kl_coef=0.3)
    group = ops.group_advantages(batch.scores, 3, "grpo")
    for b in range(6):
        length = int(batch.response_mask[b].sum())
        for t in range(length):
            to_go = sum(0.9 ** (k - t) * -0.3 * float(kl[b, k]) for k in range(t, length))
            expected = 0.9 ** (length - 1 - t) * float(group[b]) + to_go
            assert float(advantages[b, t]) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("estimator", ["reinforce++", "reinforce++-baseline"])
def test_reinforce_plus_plus_whitens_returns_of_the_shaped_rewards(estimator):
    batch = scored_batch()
    config = PPOConfig(advantage_estimator=estimator, samples_per_prompt=2, kl_estimator="k3")
    rewards, _, advantages, _ = shape_and_estimate(batch, config, kl_coef=0.1)
    scores = batch.scores
    if estimator == "reinforce++-baseline":
        scores = scores - scores.view(-1, 2).mean(-1).repeat_interleave(2)
    expected_rewards, _ = ops.shape_rewards(
        scores, batch.old_logprobs, batch.ref_logprobs, batch.response_mask, 0.1, "k3"
    )
    torch.testing.assert_close(rewards, expected_rewards)
    to_go = expected_rewards.flip(-1).cumsum(-1).flip(-1) * batch.response_mask  # gamma 1
    torch.testing.assert_close(advantages, ops.masked_whiten(to_go, batch.response_mask), atol=1e-5, rtol=1e-5)
    valid = batch.response_mask.bool()
    assert abs(float(advantages[valid].mean())) < 1e-5 and float(advantages[valid].std()) == pytest.approx(1, 1e-4)


def test_vapo_gae_uses_per_sequence_lambda_and_decoupled_returns():
    batch = scored_batch()
    config = PPOConfig(critic_lam=1.0, lam_length_alpha=0.2, whiten_advantages=False)
    rewards, _, advantages, returns = shape_and_estimate(batch, config, kl_coef=0.05)
    lam = ops.length_adaptive_lam(batch.response_mask, 0.2)
    assert (lam < 1).all() and (lam > 0).any()
    expected_advantages, _ = ops.gae(rewards, batch.old_values, batch.response_mask, 1.0, lam)
    _, expected_returns = ops.gae(rewards, batch.old_values, batch.response_mask, 1.0, 1.0)
    torch.testing.assert_close(advantages, expected_advantages)
    torch.testing.assert_close(returns, expected_returns)


def test_overlong_penalty_is_linear_over_the_buffer():
    lengths = torch.tensor([0, 5, 6, 7, 8, 10])
    mask = torch.arange(10) < lengths[:, None]
    penalty = overlong_penalties(mask, max_new_tokens=10, buffer=4, penalty=2.0)
    torch.testing.assert_close(penalty, torch.tensor([0.0, 0.0, 0.0, 0.5, 1.0, 2.0]))
    assert (overlong_penalties(mask, 10, 0, 2.0) == 0).all()


def test_groups_helpers():
    assert repeat_each([3, 1], 3) == [3, 3, 3, 1, 1, 1]
    assert varied_groups(torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0]), 2).tolist() == [False, True, False]
    from fastppo.ppo.batch import RolloutBatch

    def batch(P, T, fill):
        return RolloutBatch(
            torch.full((1, P), fill),
            torch.ones(1, P, dtype=torch.long),
            torch.full((1, T), fill),
            torch.ones(1, T, dtype=torch.long),
            torch.tensor([True]),
            ["p"],
            ["r"],
        )

    joined = concat([batch(2, 3, 7), batch(4, 1, 8)], pad_token_id=0)
    assert joined.prompt_ids.tolist() == [[0, 0, 7, 7], [8, 8, 8, 8]]  # prompts padded on the left
    assert joined.response_mask.tolist() == [[1, 1, 1], [1, 0, 0]]  # responses on the right
    assert joined.prompts == ["p", "p"] and joined.old_values is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"advantage_estimator": "ppo"}, "advantage_estimator must be one of"),
        ({"advantage_estimator": "grpo"}, "set samples_per_prompt >= 2"),
        ({"samples_per_prompt": 3}, r"samples_per_prompt \(3\) must divide rollout_batch_size"),
        ({"samples_per_prompt": 0}, "samples_per_prompt must be > 0"),
        ({"advantage_estimator": "rloo", "samples_per_prompt": 2, "critic_lam": 1.0}, "critic_lam is a GAE setting"),
        ({"advantage_estimator": "reinforce++", "lam_length_alpha": 0.05}, "lam_length_alpha is a GAE setting"),
        ({"advantage_estimator": "reinforce++", "value_warmup_steps": 2}, "value_warmup_steps trains a critic"),
        ({"critic_lam": 1.5}, "critic_lam must lie in"),
        ({"lam_length_alpha": 0.0}, "lam_length_alpha must be > 0"),
        ({"value_warmup_steps": 100}, r"value_warmup_steps \(100\) must be < steps"),
        ({"overlong_buffer": 65}, r"overlong_buffer \(65\) must be <= max_new_tokens"),
        ({"filter_groups": True}, "filter_groups drops groups"),
        ({"kl_loss_coef": -0.1}, "kl_loss_coef must be >= 0"),
        ({"kl_loss_estimator": "k5"}, "kl_loss_estimator must be one of"),
        ({"filter_groups_max_tries": 0}, "filter_groups_max_tries must be > 0"),
    ],
)
def test_estimator_settings_are_validated(overrides, message):
    with pytest.raises(InputError, match=message):
        PPOConfig(**overrides).validate()


def test_groups_must_stay_on_one_rank(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match=r"samples_per_prompt \(4\) must divide rollout_batch_size / processes \(2\)"):
        PPOConfig(rollout_batch_size=4, mini_batch_size=4, samples_per_prompt=4).validate()
    PPOConfig(rollout_batch_size=8, mini_batch_size=4, samples_per_prompt=4, advantage_estimator="grpo").validate()


# ----------------------------------------------------------------------------------------------
# the trainer end to end
# ----------------------------------------------------------------------------------------------

SETTINGS = {
    "gae": {},
    "vapo": {"critic_lam": 1.0, "lam_length_alpha": 0.05, "value_warmup_steps": 1},
    "grpo": {"samples_per_prompt": 2, "kl_in_reward": False, "kl_loss_coef": 0.1},
    "dr_grpo": {"samples_per_prompt": 2, "kl_in_reward": False},
    "rloo": {"samples_per_prompt": 4, "overlong_buffer": 3},
    "reinforce++": {"kl_loss_coef": 0.05},
    "reinforce++-baseline": {"samples_per_prompt": 2},
}


def metrics_lines(tmp_path) -> list[dict]:
    return [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]


@pytest.mark.parametrize("name", list(SETTINGS))
def test_each_estimator_trains_end_to_end(tiny_models, tmp_path, name):
    policy, reward = tiny_models["llama"]
    estimator = "gae" if name == "vapo" else name
    config = small_config(
        tmp_path, policy_model=policy, reward_model=reward, advantage_estimator=estimator, **SETTINGS[name]
    )
    trainer = PPOTrainer(config, prompts=prompt_list())
    before = {k: v.clone() for k, v in trainer.model.lm.state_dict().items()}
    trainer.train()
    last = metrics_lines(tmp_path)[-1]
    for metric in ("policy/loss", "policy/approx_kl", "reward/score_mean", "kl/coef", "optim/grad_norm"):
        assert math.isfinite(last[metric]), metric
    # dr_grpo here has no KL in the reward nor in the loss: no reference, no KL measured
    assert math.isfinite(last["policy/kl"]) if config.uses_reference else "policy/kl" not in last
    assert ("policy/ref_kl" in last) == (config.kl_loss_coef > 0)
    assert last["kl/coef"] == (config.kl_coef if config.kl_in_reward else 0.0)
    has_critic = uses_critic(estimator)
    assert (trainer.model.value_head is not None) == has_critic
    assert any(k.startswith("value/") for k in last) == has_critic  # critic-free: no value loss, no value metrics
    files = {p.name for p in (tmp_path / "run" / "checkpoint-2").iterdir()}
    assert ("value_head.safetensors" in files) == has_critic
    moved = any(not torch.equal(v, before[k]) for k, v in trainer.model.lm.state_dict().items())
    assert moved


def test_critic_free_estimators_hold_no_critic(tiny_models, tmp_path):
    """`critic: separate` is a second backbone for GAE (refused with a critic-free estimator, see test_config); a
    critic-free estimator builds neither it nor a value head: the trainable parameters (and the optimizer's state)
    are the LM's alone."""

    def trainable(estimator, **overrides):
        config = small_config(
            tmp_path / estimator, policy_model=tiny_models["llama"][0], advantage_estimator=estimator, **overrides
        )
        trainer = PPOTrainer(config, reward=count_w7, prompts=prompt_list())
        return trainer, sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)

    gae, with_critic = trainable("gae", critic="separate")
    grpo, without = trainable("grpo", samples_per_prompt=2)
    lm_size = sum(p.numel() for p in grpo.model.lm.parameters())
    critic_size = sum(p.numel() for p in gae.model.critic_parameters())
    assert grpo.model.value_head is None and grpo.model.critic_backbone is None
    assert with_critic == lm_size + critic_size and critic_size > lm_size / 2  # a backbone copy and a value head
    assert without == lm_size
    grpo.step()
    assert sum(s["exp_avg"].numel() for s in grpo.optimizer.state.values()) == lm_size


def test_each_prompt_is_sampled_samples_per_prompt_times_in_a_row(tiny_models, tmp_path):
    seen = []

    def reward(prompts, responses):
        seen.append(list(prompts))
        return count_w7(prompts, responses)

    config = small_config(
        tmp_path,
        policy_model=tiny_models["llama"][0],
        advantage_estimator="rloo",
        samples_per_prompt=4,
        rollout_batch_size=8,
        mini_batch_size=4,
        steps=1,
    )
    PPOTrainer(config, reward=reward, prompts=prompt_list()).step()
    (prompts,) = seen
    assert len(prompts) == 8 and len(set(prompts)) == 2
    assert prompts[:4] == [prompts[0]] * 4 and prompts[4:] == [prompts[4]] * 4


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_value_warmup_trains_the_critic_alone(tiny_models, tmp_path, critic):
    config = small_config(
        tmp_path,
        policy_model=tiny_models["llama"][0],
        critic=critic,
        value_warmup_steps=1,
        critic_lam=1.0,
        weight_decay=0.1,
    )
    trainer = PPOTrainer(config, reward=count_w7, prompts=prompt_list())

    def snapshot():
        lm = {k: v.clone() for k, v in trainer.model.lm.state_dict().items()}
        return lm, [p.detach().clone() for p in trainer.model.critic_parameters()]

    lm0, critic0 = snapshot()
    first = trainer.step()
    lm1, critic1 = snapshot()
    assert first["value/warmup"] == 1.0 and first["kl/coef"] == config.kl_coef
    assert all(torch.equal(lm0[k], lm1[k]) for k in lm0), "the policy moved during the critic's warm-up"
    assert any(not torch.equal(a, b) for a, b in zip(critic0, critic1, strict=True))
    second = trainer.step()
    lm2, _ = snapshot()
    assert second["value/warmup"] == 0.0 and any(not torch.equal(lm1[k], lm2[k]) for k in lm1)


def test_dynamic_sampling_drops_groups_of_equal_scores(tiny_models, tmp_path):
    """Score 1 for an odd number of words: a group of 2 agrees about half the time. Dropped groups are replaced by
    fresh prompts' groups; after the last allowed rollout, equal groups fill what is missing."""
    seen = []

    def parity(prompts, responses):
        scores = [float(len(r.split()) % 2) for r in responses]
        seen.append(scores)
        return scores

    config = small_config(
        tmp_path,
        policy_model=tiny_models["llama"][0],
        advantage_estimator="grpo",
        samples_per_prompt=2,
        rollout_batch_size=8,
        mini_batch_size=4,
        filter_groups=True,
        filter_groups_max_tries=3,
        steps=1,
    )
    trainer = PPOTrainer(config, reward=parity, prompts=prompt_list())
    metrics = trainer.step()
    rollouts = int(metrics["rollout/filter_rollouts"])
    assert rollouts == len(seen) and 1 <= rollouts <= 3
    varied = sum(int(varied_groups(torch.tensor(s), 2).sum()) for s in seen)
    assert metrics["rollout/filtered_groups"] == 4 * rollouts - varied
    assert metrics["rollout/filler_groups"] == max(4 - varied, 0)
    assert rollouts == 3 or varied >= 4  # it stops as soon as the batch is full


def test_dynamic_sampling_keeps_the_batch_full_when_every_group_agrees(tiny_models, tmp_path):
    config = small_config(
        tmp_path,
        policy_model=tiny_models["llama"][0],
        advantage_estimator="grpo",
        samples_per_prompt=2,
        filter_groups=True,
        filter_groups_max_tries=2,
        steps=1,
        kl_in_reward=False,
    )
    trainer = PPOTrainer(config, reward=lambda prompts, responses: [1.0] * len(responses), prompts=prompt_list())
    metrics = trainer.step()
    assert metrics["rollout/filter_rollouts"] == 2 and metrics["rollout/filtered_groups"] == 4
    assert metrics["rollout/filler_groups"] == 2 and metrics["policy/loss"] == 0.0  # zero advantages everywhere


@pytest.mark.parametrize("name", ["vapo", "grpo-filtered"])
def test_resume_equals_uninterrupted(tiny_models, tmp_path, name):
    """2 of 4 steps, checkpoint, resume, finish == 4 steps straight: the warm-up (3 steps, across the checkpoint),
    group sampling and dynamic sampling continue where they stopped."""
    settings = {
        "vapo": dict(critic_lam=1.0, lam_length_alpha=0.05, value_warmup_steps=3, adaptive_kl_target=1.0),
        "grpo-filtered": dict(
            advantage_estimator="grpo",
            samples_per_prompt=2,
            filter_groups=True,
            filter_groups_max_tries=2,
            kl_in_reward=False,
            kl_loss_coef=0.1,
        ),
    }[name]
    policy, reward = tiny_models["llama"]
    common = dict(policy_model=policy, reward_model=reward, steps=4, **settings)
    straight = PPOTrainer(small_config(tmp_path / "a", **common), prompts=prompt_list())
    straight.train()
    interrupted = PPOTrainer(small_config(tmp_path / "b", **common), prompts=prompt_list())
    interrupted.step(), interrupted.step()
    interrupted.save()
    del interrupted
    resumed = PPOTrainer(
        small_config(tmp_path / "b", **common, resume_from=str(tmp_path / "b" / "run")), prompts=prompt_list()
    )
    resumed.train()
    for (key, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), key
    lines_a, lines_b = metrics_lines(tmp_path / "a"), metrics_lines(tmp_path / "b")
    assert [m["step"] for m in lines_b] == [1, 2, 3, 4]
    for a, b in zip(lines_a, lines_b, strict=True):
        assert a["reward/score_mean"] == b["reward/score_mean"] and a["policy/loss"] == b["policy/loss"]


def test_estimators_listed_match_the_config_help():
    help_text = next(
        f.metadata["help"] for f in PPOConfig.__dataclass_fields__.values() if f.name == "advantage_estimator"
    )
    for estimator in ADVANTAGE_ESTIMATORS:
        assert f"'{estimator}'" in help_text, estimator
