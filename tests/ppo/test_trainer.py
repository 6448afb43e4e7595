"""The trainer end to end through the Python API, on tiny random models of four architectures."""

import json
import math

import pytest
import torch

from fastppo import PPOTrainer
from fastppo.runtime.metrics import Stats
from tests.tiny_models import count_w7, prompt_list, small_config

# gpu: with a GPU present these train on CUDA (`device` auto; `precision` auto is bf16 autocast there), and
# bench/gpu_proof.py selects them with `-m gpu`. Tests that compare two computations exactly say float32 (or CPU).
pytestmark = pytest.mark.gpu

EXPECTED_METRICS = """step reward/score_mean reward/score_std reward/shaped_mean policy/kl policy/entropy policy/loss
policy/clip_frac policy/approx_kl value/loss value/clip_frac value/explained_variance rollout/response_length_mean
rollout/response_length_max rollout/ended_rate rollout/truncated_rate perf/rollout_tokens_per_s perf/train_tokens_per_s
perf/peak_memory_mb perf/rollout_s perf/reward_s perf/logprobs_s perf/advantages_s perf/train_s perf/step_s
kl/coef optim/grad_norm optim/lr optim/skipped_steps policy/grad_norm value/grad_norm policy/ratio_max""".split()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gpt_neox"])
def test_runs_end_to_end_with_a_reward_model(tiny_models, tmp_path, arch):
    policy, reward = tiny_models[arch]
    config = small_config(tmp_path, policy_model=policy, reward_model=reward, report_to=["tensorboard"])
    trainer = PPOTrainer(config, prompts=prompt_list())
    history = trainer.train()
    assert len(history) == 2
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [m["step"] for m in lines] == [1, 2]
    for name in EXPECTED_METRICS:
        assert name in lines[-1] and math.isfinite(lines[-1][name]), name
    assert (tmp_path / "run" / "checkpoint-2" / "model.safetensors").exists()
    assert list((tmp_path / "run" / "tb").iterdir())
    assert len(trainer.generate(["w1 w2", "w3"])) == 2


def test_objects_instead_of_paths(tiny_models, tmp_path):
    pytest.importorskip("bitsandbytes", reason="reference_quantization 8bit needs bitsandbytes")
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import build_tokenizer

    config = small_config(tmp_path, reference_quantization="8bit", critic="separate", adaptive_kl_target=1.0)
    lm = AutoModelForCausalLM.from_pretrained(tiny_models["llama"][0])
    trainer = PPOTrainer(config, policy=lm, tokenizer=build_tokenizer(), reward=count_w7, prompts=prompt_list())
    metrics = trainer.step()
    assert math.isfinite(metrics["policy/loss"]) and metrics["kl/coef"] != config.kl_coef  # adaptive KL moved


def test_lora_with_adapter_reference(tiny_models, tmp_path):
    config = small_config(
        tmp_path, policy_model=tiny_models["gpt2"][0], lora_rank=4, reference="adapter", save_merged_lora=False
    )
    trainer = PPOTrainer(config, reward=count_w7, prompts=prompt_list())
    assert trainer.reference is None
    first = trainer.step()
    assert first["policy/kl"] == pytest.approx(0.0, abs=1e-5)  # policy == reference before any update
    trainer.step()
    path = trainer.save()
    assert (torch.load(f"{path}/trainer_state.pt", weights_only=True)["step"]) == 2
    assert any(p.name.startswith("adapter_model") for p in (tmp_path / "run" / "checkpoint-2").iterdir())


@pytest.mark.slow
def test_rule_based_reward_rises_while_kl_stays_finite(tiny_models, tmp_path):
    # A random policy says w7 about once in 80 tokens, so the first steps are exploration (measured here: the score
    # starts moving after 10 to 20 steps depending on the seed, then climbs to ~8, the most 8 tokens can hold).
    config = small_config(
        tmp_path,
        policy_model=tiny_models["llama"][0],
        steps=30,
        rollout_batch_size=16,
        mini_batch_size=8,
        micro_batch_size=8,
        max_new_tokens=8,
        learning_rate=3e-3,
        kl_coef=0.01,
        ppo_epochs=2,
    )
    trainer = PPOTrainer(config, reward=count_w7, prompts=prompt_list())
    history = [trainer.step() for _ in range(30)]
    first = sum(m["reward/score_mean"] for m in history[:3]) / 3
    last = sum(m["reward/score_mean"] for m in history[-3:]) / 3
    assert last > first + 1.0, (first, last)
    assert all(math.isfinite(m["policy/kl"]) for m in history)


def test_resume_equals_uninterrupted(tiny_models, tmp_path):
    """On CPU with a fixed seed: 2 of 4 steps, checkpoint, stop, resume, finish == 4 steps straight (bitwise)."""
    policy, reward = tiny_models["llama"]
    common = dict(
        policy_model=policy, reward_model=reward, steps=4, lr_scheduler="linear", adaptive_kl_target=1.0, device="cpu"
    )
    straight = PPOTrainer(small_config(tmp_path / "a", **common), prompts=prompt_list())
    straight.train()

    interrupted = PPOTrainer(small_config(tmp_path / "b", **common), prompts=prompt_list())
    interrupted.step(), interrupted.step()
    interrupted.save()  # the run stops here, as if killed right after its checkpoint at step 2
    del interrupted
    resumed_config = small_config(tmp_path / "b", **common, resume_from=str(tmp_path / "b" / "run"))
    resumed = PPOTrainer(resumed_config, prompts=prompt_list())
    assert resumed.step_count == 2
    resumed.train()

    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    lines_a = [json.loads(x) for x in open(tmp_path / "a" / "run" / "metrics.jsonl")]
    lines_b = [json.loads(x) for x in open(tmp_path / "b" / "run" / "metrics.jsonl")]
    assert [m["step"] for m in lines_b] == [1, 2, 3, 4]
    for a, b in zip(lines_a, lines_b, strict=True):
        assert a["reward/score_mean"] == b["reward/score_mean"] and a["policy/loss"] == b["policy/loss"]


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-sum"])
def test_micro_batches_accumulate_to_the_minibatch_update(tiny_models, tmp_path, loss_agg):
    """The minibatch's token (or sequence) count is every micro-batch's denominator, so micro_batch_size 1 and
    micro_batch_size = mini_batch_size take the same optimizer step (up to float summation order)."""
    models = []
    for micro in (1, 4):
        config = small_config(
            tmp_path / f"micro{micro}",
            policy_model=tiny_models["llama"][0],
            steps=1,
            rollout_batch_size=4,
            mini_batch_size=4,
            micro_batch_size=micro,
            loss_agg=loss_agg,
            max_grad_norm=None,
            max_new_tokens=8,
            precision="float32",  # bf16 autocast would round micro-batches of different sizes differently
        )
        trainer = PPOTrainer(config, reward=count_w7, prompts=prompt_list())
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        metrics = trainer.step()
        models.append((trainer.model.state_dict(), metrics))
    (accumulated, m1), (whole, m4) = models
    assert m1["rollout/response_length_mean"] == m4["rollout/response_length_mean"]  # the same rollout
    for name in ("policy/loss", "value/loss", "policy/entropy", "policy/approx_kl", "value/clip_frac"):
        assert m1[name] == pytest.approx(m4[name], rel=1e-4, abs=1e-6), name
    assert m4["value/loss"] > 1e-4  # not trivially equal
    moved = 0
    for name, a in accumulated.items():
        # Adam divides each gradient element by its own magnitude: an element whose gradient is near eps turns a
        # summation-order difference into up to lr (1e-3); 1% of lr bounds it, a wrong denominator moves far more.
        torch.testing.assert_close(a, whole[name], atol=1e-5, rtol=1e-5, msg=name)
        moved += int(not torch.equal(a, before[name]))
    assert moved > 0  # the step did change the weights, so the comparison means something


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_the_entropy_bonus_is_aggregated_like_the_policy_loss(tiny_models, tmp_path, monkeypatch, loss_agg):
    """With the policy loss zeroed, an update's gradient is that of -entropy_coef x the entropy aggregated by
    loss_agg: per token, per sequence mean, or per sequence sum, over the minibatch's sequences."""
    from fastppo import ops

    policy, _ = tiny_models["llama"]
    config = small_config(
        tmp_path,
        policy_model=policy,
        advantage_estimator="reinforce++",
        entropy_coef=0.5,
        loss_agg=loss_agg,
        mini_batch_size=4,
        micro_batch_size=4,
        max_new_tokens=5,
        precision="float32",  # the recomputation below runs outside the trainer's autocast
    )
    trainer = PPOTrainer(config, reward=count_w7, prompts=prompt_list())
    batch = trainer.rollout(prompt_list()[:4])
    batch.response_mask[1, 2:] = 0  # responses of different lengths (5, 2, 4, 5), where the three rules differ
    batch.response_mask[2, 4:] = 0
    trainer.score(batch)
    trainer.compute_logprobs(batch)
    trainer.shape_rewards(batch)
    trainer.estimate_advantages(batch)
    mask, P = batch.response_mask, batch.prompt_ids.shape[1]
    monkeypatch.setattr(ops, "ppo_policy_loss", lambda logprobs, *args, **kwargs: (logprobs.sum() * 0.0, {}))
    lengths = mask.sum(-1).double()
    denominator = float(lengths.sum()) if loss_agg == "token-mean" else float((lengths > 0).sum())
    trainer.optimizer.zero_grad()
    trainer._micro_step(batch, denominator, token_share=1.0, stats=Stats())
    ours = [p.grad.clone() for p in trainer.model.lm.parameters()]

    trainer.optimizer.zero_grad()
    _, entropy, _ = trainer.model(batch.input_ids, batch.attention_mask, P, config.temperature)
    per_sequence = (entropy.double() * mask).sum(-1)
    expected = {
        "token-mean": per_sequence.sum() / lengths.sum(),
        "seq-mean-token-mean": (per_sequence / lengths.clamp(min=1)).mean(),
        "seq-mean-token-sum": per_sequence.mean(),
    }[loss_agg]
    (-0.5 * expected).backward()
    for got, param in zip(ours, trainer.model.lm.parameters(), strict=True):
        torch.testing.assert_close(got, param.grad, rtol=1e-4, atol=1e-6)


def test_target_kl_stops_the_updates_of_a_step(tiny_models, tmp_path):
    """target_kl (SB3's early stop): a minibatch whose approx_kl exceeds it ends the step without its update; one
    never exceeded changes nothing."""

    def one_step(name, **overrides):
        config = small_config(
            tmp_path / name,
            policy_model=tiny_models["llama"][0],
            steps=1,
            ppo_epochs=2,
            learning_rate=1e-2,
            **overrides,
        )
        trainer = PPOTrainer(config, reward=count_w7, prompts=prompt_list())
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        return trainer, trainer.step(), before

    plain, plain_metrics, _ = one_step("plain")
    loose, loose_metrics, _ = one_step("loose", target_kl=1e9)
    assert loose_metrics["optim/early_stopped"] == 0.0 and "optim/early_stopped" not in plain_metrics
    for key, value in plain.model.state_dict().items():
        assert torch.equal(value, loose.model.state_dict()[key]), key
    tight, tight_metrics, before = one_step("tight", target_kl=1e-30)
    assert tight_metrics["optim/early_stopped"] == 1.0 and math.isfinite(tight_metrics["policy/approx_kl"])
    plain_weights, tight_weights = plain.model.state_dict(), tight.model.state_dict()
    assert any(not torch.equal(v, before[k]) for k, v in plain_weights.items())  # the full step moved the policy
    assert any(not torch.equal(v, tight_weights[k]) for k, v in plain_weights.items())  # the stopped one did less


# --- what TRL's users bring ----------------------------------------------------------------------------------------


def test_generate_renders_chat_messages_with_the_template(tiny_models, tmp_path):
    """Messages given to generate / rollout are rendered with the chat template, content parts as their text: not
    tokenized as the Python repr of the list."""
    from tests.tiny_models import build_tokenizer

    config = small_config(tmp_path, policy_model=tiny_models["llama"][0], max_new_tokens=2)
    trainer = PPOTrainer(config, reward=count_w7, prompts=prompt_list())
    messages = [{"role": "user", "content": "w1 w2"}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "w1 "}, {"type": "text", "text": "w2"}]}]
    batch = trainer.rollout([messages, parts, "w1 w2"])
    expected = build_tokenizer()("user: w1 w2 <|im_end|> assistant:")["input_ids"]
    for row, mask in zip(batch.prompt_ids[:2], batch.prompt_mask[:2], strict=True):
        assert row[mask.bool()].tolist() == expected
    assert batch.prompts[0].messages == messages and batch.prompts[2] == "w1 w2"
    assert len(trainer.generate([parts])) == 1


def test_trl_reward_functions_get_the_rows_they_score(tiny_models, tmp_path):
    """TRL's GRPO setup: a datasets.Dataset of chat prompts with extra columns, reward functions written for TRL's
    GRPOTrainer (a column by name, keyword-only, **kwargs) mixed with a fastppo one and a reward model, weighted.
    Every function receives, for each response it scores, that response and the columns of the row it answers."""
    datasets = pytest.importorskip("datasets")
    rows = [
        {"prompt": [{"role": "user", "content": f"w{i} w{i + 1}"}], "answer": f"w{i + 2}", "id": i} for i in range(6)
    ]
    calls = []

    def accuracy(completions, answer, **kwargs):
        calls.append(("accuracy", dict(kwargs, completions=completions, answer=answer)))
        return [float(a in c[0]["content"].split()) for c, a in zip(completions, answer, strict=True)]

    def odd_ids_only(*, completion_ids, id, **kwargs):  # noqa: A002 - the dataset's column is called id
        calls.append(("odd_ids_only", dict(kwargs, completion_ids=completion_ids, id=id)))
        return [1.0 if i % 2 else None for i in id]

    policy, reward_model = tiny_models["llama"]
    config = small_config(
        tmp_path,
        policy_model=policy,
        reward_funcs=[accuracy, odd_ids_only, count_w7, reward_model],
        reward_weights=[1.0, 0.5, 0.25, 0.1],
        advantage_estimator="grpo",
        samples_per_prompt=2,
    )
    trainer = PPOTrainer(config, prompts=datasets.Dataset.from_list(rows))
    batch, _ = trainer.sample()
    by_id = {row["id"]: row for row in rows}
    (_, first), (_, second) = calls
    assert first["completions"] == [[{"role": "assistant", "content": r}] for r in batch.responses]
    for i, prompt in enumerate(batch.prompts):
        row = by_id[first["id"][i]]
        assert first["prompts"][i] == row["prompt"] == prompt.messages  # the row this response answers
        assert first["answer"][i] == row["answer"] and second["id"][i] == row["id"]
        assert trainer.tokenizer.decode(second["completion_ids"][i], skip_special_tokens=True) == batch.responses[i]
    assert second["trainer_state"].global_step == 0 and second["trainer_state"].max_steps == config.steps
    scores = batch.reward_scores.cpu()
    expected = (scores * torch.tensor([1.0, 0.5, 0.25, 0.1])).nansum(dim=1)
    torch.testing.assert_close(batch.raw_scores.cpu(), expected)
    assert scores[:, 1].isnan().tolist() == [i % 2 == 0 for i in first["id"]]  # None: not applied
    metrics = trainer.step()
    for name in ("accuracy", "odd_ids_only", "count_w7", "llama-reward"):
        assert math.isfinite(metrics[f"rewards/{name}/mean"]) and f"rewards/{name}/std" in metrics


def accuracy(completions, answer, **kwargs):
    """TRL's GRPOTrainer form: the responses as `completions`, the dataset's `answer` column by name."""
    CALLS.append({"completions": completions, "answer": answer, **kwargs})
    return [float(a in c.split()) for c, a in zip(completions, answer, strict=True)]


CALLS: list[dict] = []


def test_a_trl_reward_function_is_called_by_keyword_with_the_rows_columns(tiny_models, tmp_path):
    """Called by position, `accuracy` got the prompts as its completions and the responses as the answers, scored
    0 and training went on."""
    rows = [{"prompt": f"w{i} w{i + 1}", "answer": f"w{i + 2}"} for i in range(8)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = small_config(tmp_path, policy_model=tiny_models["llama"][0], prompts=str(prompts))
    CALLS.clear()
    trainer = PPOTrainer(config, reward=accuracy)
    batch, _ = trainer.sample()
    (call,) = CALLS
    assert call["completions"] == batch.responses
    assert call["answer"] == [{row["prompt"]: row["answer"] for row in rows}[p] for p in batch.prompts]
    assert call["prompts"] == [str(p) for p in batch.prompts]


@pytest.mark.parametrize("vocabulary", ["larger", "smaller"])
def test_a_reward_model_object_scores_as_its_path_does(vocabulary, tiny_models, tmp_path):
    """A reward model of another architecture with a tokenizer of its own, passed as an object: scored with its own
    tokenizer, as the same model given as a path. With the policy's it scored other tokens (a larger vocabulary)
    or stopped step 1 with an IndexError (a smaller one)."""
    from transformers import AutoModelForSequenceClassification

    from tests.tiny_models import WORDS, save_reward_model

    words = [*reversed(WORDS), *(f"x{i}" for i in range(40))] if vocabulary == "larger" else WORDS[:60][::-1]
    path = save_reward_model(tmp_path, "gpt2", words)
    policy = tiny_models["llama"][0]
    by_path = PPOTrainer(small_config(tmp_path / "a", policy_model=policy, reward_model=path), prompts=prompt_list())
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    by_object = PPOTrainer(small_config(tmp_path / "b", policy_model=policy), reward=model, prompts=prompt_list())
    batch = by_path.rollout(prompt_list()[:4] + ["w70 w80 w89"])
    by_path.score(batch)
    expected = batch.raw_scores.clone()
    by_object.score(batch)
    torch.testing.assert_close(batch.raw_scores, expected, rtol=0, atol=1e-6)
