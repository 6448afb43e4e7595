"""Trimmed, length-sorted micro-batches: the same PPO step as the padded one, paying for real tokens only."""

import copy
from dataclasses import fields

import pytest
import torch

from fastppo import PPOTrainer
from fastppo.ppo import trainer as trainer_module
from fastppo.ppo.batch import (
    RESPONSE_FIELDS,
    RolloutBatch,
    in_row_order,
    micro_batches,
    plan_micro_batches,
    widen,
)
from tests.tiny_models import count_w7, prompt_list, small_config


def synthetic_batch(prompt_lengths, response_lengths, P=6, T=8, K=3) -> RolloutBatch:
    """Left-padded prompts and right-padded responses of the given lengths; every (B, T) field filled with its row
    and column numbers, so a cut in the wrong place shows."""
    B = len(prompt_lengths)
    prompt_mask = torch.zeros(B, P, dtype=torch.long)
    response_mask = torch.zeros(B, T, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_lengths, response_lengths, strict=True)):
        prompt_mask[i, P - p :] = 1
        response_mask[i, :r] = 1
    grid = torch.arange(B * T, dtype=torch.float32).view(B, T)
    values = {name: grid.clone() for name in RESPONSE_FIELDS}
    values["response_ids"] = grid.long() * response_mask
    values["response_mask"] = response_mask
    return RolloutBatch(
        prompt_ids=torch.arange(B * P).view(B, P) * prompt_mask,
        prompt_mask=prompt_mask,
        ended=torch.ones(B, dtype=torch.bool),
        prompts=[f"p{i}" for i in range(B)],
        responses=[f"r{i}" for i in range(B)],
        reward_scores=torch.zeros(B, K),  # (B, K): not a response field, never cut
        **values,
    )


def test_every_response_aligned_field_is_cut_and_nothing_else():
    batch = synthetic_batch(prompt_lengths=[2, 3], response_lengths=[1, 4], P=6, T=8, K=8)
    trimmed = batch.trimmed()
    assert trimmed.prompt_ids.shape == (2, 3) and torch.equal(trimmed.prompt_ids, batch.prompt_ids[:, 3:])
    for name in RESPONSE_FIELDS:
        assert torch.equal(getattr(trimmed, name), getattr(batch, name)[:, :4]), name
    assert trimmed.reward_scores.shape == (2, 8)  # as wide as T, and still not cut
    # Every (B, T) tensor field is listed: a field added to the batch without it would keep its padding.
    two_d = {f.name for f in fields(batch) if isinstance(getattr(batch, f.name), torch.Tensor)}
    assert two_d - set(RESPONSE_FIELDS) == {"prompt_ids", "prompt_mask", "ended", "reward_scores"}
    assert batch.real_and_computed_tokens() == (10, 28) and trimmed.real_and_computed_tokens() == (10, 14)


@pytest.mark.parametrize("response_lengths", [[8, 8, 8], [0, 0, 0], [1, 0, 8]])
def test_full_empty_and_mixed_rows(response_lengths):
    batch = synthetic_batch(prompt_lengths=[6, 1, 3], response_lengths=response_lengths)
    trimmed = batch.trimmed()
    assert trimmed.response_ids.shape[1] == max(max(response_lengths), 1)  # T=1 at least: a forward needs a column
    assert trimmed.prompt_ids.shape[1] == 6
    assert torch.equal(widen(trimmed.old_logprobs * trimmed.response_mask, 8), batch.old_logprobs * batch.response_mask)


def test_micro_batches_group_by_length_and_results_return_to_their_rows():
    lengths = [8, 1, 7, 2, 8, 1, 3, 6]
    batch = synthetic_batch(prompt_lengths=[2] * 8, response_lengths=lengths)
    rows, parts = [], []
    for chunk, micro in micro_batches(batch, torch.arange(8), size=2):
        assert micro.response_ids.shape[1] == max(lengths[i] for i in chunk.tolist())
        rows.append(chunk)
        parts.append(widen(micro.old_logprobs, 8))
    assert [micro.response_ids.shape[1] for _, micro in micro_batches(batch, torch.arange(8), 2)] == [1, 3, 7, 8]
    restored = in_row_order(parts, rows)
    mask = batch.response_mask.bool()
    assert torch.equal(restored[mask], batch.old_logprobs[mask])
    assert torch.all(restored[:, 7:][torch.tensor(lengths) < 7] == 0)  # past its micro-batch's width: zeros


def test_a_token_budget_groups_rows_by_length_up_to_it():
    """Short rows many to a micro-batch, long rows few; the row cap still holds; one row longer than the budget goes
    alone; every row exactly once."""
    responses = [8, 1, 7, 2, 8, 1, 3, 6, 1, 1]
    batch = synthetic_batch(prompt_lengths=[2] * 10, response_lengths=responses, T=8)
    chunks = plan_micro_batches(batch, torch.arange(10), size=4, tokens=12)
    widths = [(len(c), 2 + max(responses[i] for i in c.tolist())) for c in chunks]
    assert widths == [(4, 3), (2, 5), (1, 8), (1, 9), (1, 10), (1, 10)]  # 4 x 3 and 2 x 5 fit in 12, 2 x 9 not
    assert sorted(torch.cat(chunks).tolist()) == list(range(10))
    assert [len(c) for c in plan_micro_batches(batch, torch.arange(10), size=3, tokens=1000)] == [3, 3, 3, 1]
    # FSDP: another rank cut more micro-batches; this one halves its costliest until it has as many
    split = plan_micro_batches(batch, torch.arange(10), size=10, tokens=1000, count=3)
    assert [len(c) for c in split] == [5, 2, 3] and sorted(torch.cat(split).tolist()) == list(range(10))
    assert len(plan_micro_batches(batch, torch.arange(2), size=10, count=5)) == 2  # never below a row each


def padded_micro_batches(batch, rows, size, tokens=None, overhead=None):
    """Before trimming: the minibatch's rows in order, every micro-batch at the rollout's full width."""
    for chunk in rows.split(size):
        yield chunk, batch.select(chunk)


def varlen_trainer(tmp_path, policy, estimator="gae", micro_batch_tokens=None, **overrides):
    """A trainer and one rollout of answers of 2 to 16 tokens to prompts of 2 to 5."""
    config = small_config(
        tmp_path,
        policy_model=policy,
        rollout_batch_size=8,
        mini_batch_size=4,
        micro_batch_size=2 if micro_batch_tokens is None else None,  # None: up to the minibatch's 4 rows
        max_new_tokens=16,
        old_logprobs="recompute",  # the policy's forward in step 3 too
        precision="float32",
        device="cpu",
        advantage_estimator=estimator,
        samples_per_prompt=1 if estimator == "gae" else 2,
        micro_batch_tokens=micro_batch_tokens,
        **overrides,
    )
    trainer = PPOTrainer(config, reward=count_w7, prompts=prompt_list())
    rollout = trainer.rollout(prompt_list(8, seed=3))
    for i, length in enumerate([16, 2, 9, 4, 2, 13, 6, 3]):
        rollout.response_mask[i, length:] = 0
        rollout.response_ids[i, length:] = trainer.tokenizer.pad_token_id
    return trainer, rollout


def compare_steps(trainer, rollout, change) -> tuple[dict, dict]:
    """One PPO step from `rollout`, then the same step from the same weights after `change()`: the old, reference
    log-probs, values, advantages, returns, every statistic but perf/ and the weights after it agree. Returns the two
    steps' statistics."""
    model_state = copy.deepcopy(trainer.model.state_dict())
    optimizer_state = copy.deepcopy(trainer.optimizer.state_dict())

    def one_step():
        batch = copy.deepcopy(rollout)
        torch.manual_seed(1)  # the minibatches' shuffle
        trainer.score(batch)
        stats = trainer.compute_logprobs(batch)
        trainer.shape_rewards(batch)
        trainer.estimate_advantages(batch)
        stats |= trainer.ppo_update(batch)
        weights = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
        return batch, stats, weights

    first_batch, first_stats, first_weights = one_step()
    trainer.model.load_state_dict(model_state)
    trainer.optimizer.load_state_dict(optimizer_state)
    change()
    second_batch, second_stats, second_weights = one_step()

    mask = rollout.response_mask.bool()
    for name in ("old_logprobs", "ref_logprobs", "old_values", "advantages", "returns"):
        first, second = getattr(first_batch, name), getattr(second_batch, name)
        if second is not None:
            torch.testing.assert_close(first[mask], second[mask], atol=1e-5, rtol=1e-5, msg=name)
    for name, value in second_stats.items():
        if not name.startswith("perf/"):
            assert first_stats[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    for name, weight in second_weights.items():
        torch.testing.assert_close(first_weights[name], weight, atol=1e-5, rtol=1e-5, msg=name)
    return first_stats, second_stats


@pytest.mark.parametrize("estimator, micro_batch_tokens", [("gae", None), ("rloo", None), ("gae", 40)])
def test_one_step_trimmed_equals_the_padded_step(tiny_models, tmp_path, monkeypatch, estimator, micro_batch_tokens):
    """Answers of 2 to 16 tokens and prompts of 2 to 5: the same losses, statistics and weights after the step
    (micro-batches of 2 rows, or of 1 to 4 rows by a token budget)."""
    trainer, rollout = varlen_trainer(tmp_path, tiny_models["llama"][0], estimator, micro_batch_tokens)
    trimmed_stats, padded_stats = compare_steps(
        trainer, rollout, lambda: monkeypatch.setattr(trainer_module, "micro_batches", padded_micro_batches)
    )
    assert padded_stats["perf/train_real_frac"] < trimmed_stats["perf/train_real_frac"] <= 1.0
    assert padded_stats["perf/logprobs_real_frac"] < trimmed_stats["perf/logprobs_real_frac"] <= 1.0


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_one_packed_step_equals_the_trimmed_step(tiny_models, tmp_path, monkeypatch, critic):
    """padding_free: the policy's, critic's and reference's forwards over packed rows give the trimmed step's
    log-probs, values, statistics and weights."""
    from fastppo import models

    trainer, rollout = varlen_trainer(tmp_path, tiny_models["llama"][0], padding_free=True, critic=critic)
    assert trainer.model.padding_free and trainer.reference_padding_free
    assert trainer.model.critic_padding_free == (critic == "separate")
    packed_calls = []
    packed_hidden = models.packed_hidden
    monkeypatch.setattr(models, "packed_hidden", lambda *args: packed_calls.append(1) or packed_hidden(*args))

    def unpacked():
        trainer.model.padding_free = trainer.model.critic_padding_free = trainer.reference_padding_free = False
        packed_calls.append("off")

    compare_steps(trainer, rollout, unpacked)
    forwards = packed_calls[: packed_calls.index("off")]
    assert forwards and packed_calls[-1] == "off"  # packed forwards in the first step, none in the second
