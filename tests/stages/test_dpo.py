"""`fastppo dpo`: the losses against the papers' formulas, training raises the margin, resume, LoRA, bad input."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from fastppo.cli import main
from fastppo.runtime.errors import InputError
from fastppo.stages.dpo import DPOTrainer, dpo_loss, pack, sequence_logprobs
from fastppo.stages.dpo_config import DPOConfig
from tests.stages.test_reward_model import sentiment_pairs, write_jsonl

# ----------------------------------------------------------------------------------------------
# the loss, against float64 references written from the papers
# ----------------------------------------------------------------------------------------------


def paper_loss(pc, pr, rc, rr, beta, loss, eps):
    """Per-pair losses in float64: DPO eq. 7 (Rafailov et al. 2023), conservative DPO (Mitchell 2023), IPO eq. 17
    (Azar et al. 2023, tau = beta). h is the difference of the chosen and rejected log-ratios to the reference."""
    h = (pc - rc) - (pr - rr)
    sigma = lambda x: 1.0 / (1.0 + torch.exp(-x))
    if loss == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    eps = eps if loss == "label_smoothing" else 0.0
    return -(1 - eps) * torch.log(sigma(beta * h)) - eps * torch.log(sigma(-beta * h))


def paper_gradient_wrt_h(h, beta, loss, eps):
    """dL/dh in closed form; dL/d log pi(y_w) = dL/dh and dL/d log pi(y_l) = -dL/dh. For DPO this is the paper's
    gradient: -beta * sigmoid(-beta h), the weight that is largest when the implicit reward orders the pair wrongly."""
    sigma = lambda x: 1.0 / (1.0 + torch.exp(-x))
    if loss == "ipo":
        return 2.0 * (h - 1.0 / (2.0 * beta))
    eps = eps if loss == "label_smoothing" else 0.0
    return -(1 - eps) * beta * sigma(-beta * h) + eps * beta * sigma(beta * h)


@pytest.mark.parametrize(
    "loss, eps", [("sigmoid", 0.0), ("label_smoothing", 0.1), ("label_smoothing", 0.4), ("ipo", 0.0)]
)
@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 3.0])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
def test_loss_and_gradients_match_the_papers(loss, eps, beta, dtype, tol):
    g = torch.Generator().manual_seed(int(beta * 100) + len(loss))
    # Sequence log-probs of 37 pairs, with a few far-apart ones (|beta h| up to ~60) where a naive log(sigmoid) fails.
    logps = [-torch.rand(37, generator=g, dtype=torch.float64) * 40 for _ in range(4)]
    logps[0][:3] = torch.tensor([-1.0, -150.0, -2.0], dtype=torch.float64)
    inputs = [x.to(dtype).requires_grad_() for x in logps]
    losses, chosen_rewards, rejected_rewards = dpo_loss(*inputs, beta, loss, eps)
    losses.sum().backward()

    expected = paper_loss(*[x.double() for x in inputs], beta, loss, eps)
    h = (inputs[0].double() - inputs[2].double()) - (inputs[1].double() - inputs[3].double())
    dh = paper_gradient_wrt_h(h.detach(), beta, loss, eps)
    scale = 1.0 + expected.abs()  # relative where the loss is large (IPO's square of a big h)
    checks = {
        "loss": (losses, expected),
        "d/d policy_chosen": (inputs[0].grad, dh),
        "d/d policy_rejected": (inputs[1].grad, -dh),
        "d/d reference_chosen": (inputs[2].grad, -dh),
        "d/d reference_rejected": (inputs[3].grad, dh),
        "chosen reward": (chosen_rewards, beta * (inputs[0] - inputs[2]).double()),
        "rejected reward": (rejected_rewards, beta * (inputs[1] - inputs[3]).double()),
    }
    for name, (got, want) in checks.items():
        err = ((got.double() - want.detach()).abs() / (scale if name == "loss" else 1 + want.detach().abs())).max()
        bad = ((got.double() - want.detach()).abs() > tol * (1 + want.detach().abs())).nonzero().flatten().tolist()
        assert err <= tol, f"{name}: max relative error {err:.2e} at rows {bad[:5]}"
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_equal_policy_and_reference_give_log_2_and_zero_rewards():
    x = torch.randn(5)
    losses, chosen, rejected = dpo_loss(x, x - 1, x, x - 1, beta=0.1)
    assert torch.allclose(losses, torch.full((5,), math.log(2))) and not chosen.any() and not rejected.any()


# ----------------------------------------------------------------------------------------------
# the trainer on tiny models
# ----------------------------------------------------------------------------------------------


def config(tmp_path, model, **overrides) -> DPOConfig:
    values = dict(
        model=model,
        data=sentiment_pairs(96),
        output_dir=str(tmp_path / "run"),
        learning_rate=1e-3,
        batch_size=8,
        epochs=1.0,
        max_length=32,
        eval_fraction=0.1,
        eval_every=4,
        kl_samples=4,
        max_new_tokens=6,
        tensorboard=False,
    )
    values.update(overrides)
    return DPOConfig(**values)


def test_sequence_logprobs_match_the_logits_of_an_unpadded_forward(base_model):
    """Left-padded prompts, right-padded responses, fused head: the same sums as the plain logits, row by row."""
    lm = AutoModelForCausalLM.from_pretrained(base_model).eval()
    rows = [([2, 10, 11], [20, 21, 22, 3]), ([2, 12], [23, 3]), ([2, 13, 14, 15, 16], [24, 25, 26, 27, 28, 3])]
    input_ids, attention_mask, response_mask, P = pack(rows, pad_id=0)
    with torch.no_grad():
        fused = sequence_logprobs(lm, input_ids, attention_mask, response_mask, P, fused=True)
        plain = sequence_logprobs(lm, input_ids, attention_mask, response_mask, P, fused=False)
        for i, (prompt, response) in enumerate(rows):
            logits = lm(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1]
            expected = logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None]).sum()
            assert fused[i] == pytest.approx(float(expected), abs=1e-4)
            assert plain[i] == pytest.approx(float(expected), abs=1e-4)


def test_training_raises_the_margin_and_saves_a_hugging_face_checkpoint(tmp_path, base_model):
    trainer = DPOTrainer(config(tmp_path, base_model, epochs=2.0))
    history = trainer.train()
    first, last = history[0], history[-1]
    # Step 1 runs on the starting weights, so the cached reference log-probs must equal the policy's exactly.
    assert first["policy/loss"] == pytest.approx(math.log(2), abs=1e-5) and first["rewards/margin"] == 0
    assert last["rewards/margin"] > 0.2 and last["eval/rewards_margin"] > 0.2, (first, last)
    assert last["eval/rewards_accuracy"] > 0.9 and last["policy/loss"] < 0.6
    assert math.isfinite(last["eval/kl"]) and last["eval/response_length"] > 0

    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, trainer.total_steps + 1))
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracy", "lr"} <= set(rows[0])
    assert "eval/kl" in rows[3] and "eval/kl" not in rows[2]  # every eval_every = 4 steps
    checkpoint = tmp_path / "run" / f"checkpoint-{trainer.total_steps}"
    assert (checkpoint / "manifest.json").exists() and not (checkpoint / "value_head.safetensors").exists()
    saved = AutoModelForCausalLM.from_pretrained(checkpoint)
    for name, p in trainer.lm.state_dict().items():
        torch.testing.assert_close(saved.state_dict()[name], p, msg=name)


def test_bf16_precision_autocasts_the_log_probs(tmp_path, base_model):
    """precision: bf16 on a CPU: the cached reference log-probs are bf16-autocast forwards (close to float32's, not
    equal), and the policy's first step, under the same autocast on the same weights, equals them: loss log 2. The
    sampled KL decodes in float32 (a CPU's fast path) and scores under autocast: 0 before any update."""
    plain = DPOTrainer(config(tmp_path / "float32", base_model, kl_samples=0)).reference_logps["train"]
    trainer = DPOTrainer(config(tmp_path / "bf16", base_model, precision="bf16"))
    assert trainer.autocast_dtype == torch.bfloat16
    autocast = trainer.reference_logps["train"]
    assert 0 < (autocast - plain).abs().max() < 0.01 * plain.abs().max()  # sums of ~30 tokens' bf16 rounding
    assert trainer.evaluate()["eval/kl"] == 0.0
    assert trainer.step()["policy/loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_reference_runs_only_before_training_when_kl_is_off(tmp_path, base_model):
    trainer = DPOTrainer(config(tmp_path, base_model, kl_samples=0))
    assert trainer.reference is None  # its log-probs are cached: the copy is freed
    assert trainer.reference_logps["train"].shape == (len(trainer.train_data), 2)
    trainer.step()


def test_lora_reference_is_the_policy_with_adapters_off(tmp_path, base_model):
    trainer = DPOTrainer(config(tmp_path, base_model, lora_rank=4, learning_rate=1e-2, epochs=0.5))
    assert trainer.reference is None and hasattr(trainer.lm, "disable_adapter")
    history = trainer.train()
    assert history[0]["policy/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert history[-1]["rewards/margin"] > 0
    # The adapters moved the policy, not the reference: with them off, the cache still holds.
    reference = trainer._reference_logps(trainer.train_data[:8])
    torch.testing.assert_close(reference, trainer.reference_logps["train"][:8])
    # The checkpoint keeps the adapter apart, so a resumed run continues with the same adapter weights.
    resumed = DPOTrainer(
        config(tmp_path, base_model, lora_rank=4, learning_rate=1e-2, epochs=0.5, resume_from=str(tmp_path / "run"))
    )
    assert resumed.step_count == trainer.total_steps
    for name, p in trainer.lm.state_dict().items():
        torch.testing.assert_close(resumed.lm.state_dict()[name], p, msg=name)


def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path, base_model):
    straight = DPOTrainer(config(tmp_path / "a", base_model))
    straight.train()

    interrupted = DPOTrainer(config(tmp_path / "b", base_model))
    for _ in range(5):
        interrupted.step()
    interrupted.save()
    resumed = DPOTrainer(config(tmp_path / "b", base_model, resume_from=str(tmp_path / "b" / "run")))
    assert resumed.step_count == 5
    resumed.train()

    for name, p in straight.lm.state_dict().items():
        torch.testing.assert_close(resumed.lm.state_dict()[name], p, msg=name)
    read = lambda d: [json.loads(line) for line in open(d / "run" / "metrics.jsonl")]
    a, b = read(tmp_path / "a"), read(tmp_path / "b")
    assert [r["step"] for r in b] == [r["step"] for r in a]
    for ra, rb in zip(a, b, strict=True):
        compared = [k for k in ra if not k.startswith(("time/", "perf/"))]
        evaluated = ra["step"] % 4 == 0 or ra["step"] == len(a)  # every eval_every steps and at the end
        assert set(compared) <= set(rb) and any(k.startswith("eval/") for k in compared) == evaluated
        assert {k: rb[k] for k in compared} == pytest.approx({k: ra[k] for k in compared}, abs=1e-5)


def test_a_resumed_run_keeps_the_precision_auto_chose_at_its_start(tmp_path, base_model, monkeypatch, capsys):
    """precision auto is a timing on a CPU: a resume must not switch precision halfway, whatever its probe says."""
    from fastppo.runtime import precision

    for chose in (True, False):
        run = tmp_path / str(chose)
        monkeypatch.setattr(precision, "bf16_pays_on_cpu", lambda model, chose=chose: chose)
        trainer = DPOTrainer(config(run, base_model, precision="auto", device="cpu", kl_samples=0))
        assert (trainer.autocast_dtype is not None) is chose
        trainer.step()
        trainer.save()
        monkeypatch.setattr(precision, "bf16_pays_on_cpu", lambda model, chose=chose: not chose)  # the probe flips
        resumed = DPOTrainer(config(run, base_model, precision="auto", device="cpu", resume_from=str(run / "run")))
        assert resumed.step_count == 1 and (resumed.autocast_dtype is not None) is chose
        said = f"precision auto: {'bf16' if chose else 'float32'}, as the run chose at its start"
        assert said in capsys.readouterr().out
        explicit = config(run, base_model, precision="float32", resume_from=str(run / "run"))
        assert DPOTrainer(explicit).autocast_dtype is None  # asked: honoured


def test_cli_runs_and_resumes(tmp_path, base_model):
    data = write_jsonl(tmp_path / "prefs.jsonl", sentiment_pairs(48))
    out = str(tmp_path / "out")
    argv = [
        "dpo",
        "--model",
        base_model,
        "--data",
        data,
        "--output-dir",
        out,
        "--lr",
        "1e-3",
        "--batch-size",
        "8",
        "--max-length",
        "32",
        "--kl-samples",
        "2",
        "--max-new-tokens",
        "4",
        "--loss",
        "ipo",
        "--beta",
        "0.5",
    ]
    assert main(argv) == 0
    assert main(argv) == 2  # checkpoints there already: resume or overwrite, never silently mixed
    assert main([*argv, "--epochs", "2", "--resume"]) == 2  # a different schedule cannot continue that run
    assert main([*argv, "--resume"]) == 0  # already complete: resumes at the end and stops
    assert os.path.isdir(os.path.join(out, "tb"))


def test_a_tokenizer_without_eos_is_refused(tmp_path, base_model):
    """Every encoded response ends with EOS: DPO refuses such a tokenizer as `fastppo sft` does (one check)."""
    from fastppo.demo.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.eos_token = None
    with pytest.raises(InputError, match="tokenizer: the tokenizer has no eos token"):
        DPOTrainer(config(tmp_path, base_model), tokenizer=tokenizer)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--beta", "0"], "beta must be > 0"),
        (["--beta", "-1"], "beta must be > 0"),
        (["--beta", "nan"], "beta must be a finite number"),
        (["--loss", "hinge"], "loss must be one of sigmoid, ipo, label_smoothing"),
        (["--loss", "label_smoothing"], "label_smoothing must lie in (0, 0.5)"),
        (["--label-smoothing", "0.1"], "label_smoothing is used by loss 'label_smoothing' only"),
        (["--lora-rank", "4", "--reference-quantization", "4bit"], "reference_quantization: with LoRA"),
        (["--data", "missing.jsonl"], "data: path missing.jsonl does not exist"),
        (["--model", "no-such-model"], "model: path no-such-model does not exist"),
        (["--data", "@missing-field"], 'prefs.jsonl:2: field "rejected" is missing'),
        (["--data", "@not-json"], "prefs.jsonl:3: not valid JSON"),
    ],
)
def test_bad_input_exits_2_before_anything_loads(tmp_path, base_model, capsys, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    good = json.dumps(sentiment_pairs(1)[0])
    bad_files = {"@missing-field": [good, '{"prompt": "p", "chosen": "c"}'], "@not-json": [good, "", "{not json"]}
    for i, flag in enumerate(flags):
        if flag in bad_files:
            (tmp_path / "prefs.jsonl").write_text("\n".join(bad_files[flag]) + "\n")
            flags[i] = str(tmp_path / "prefs.jsonl")
    data = write_jsonl(tmp_path / "good.jsonl", sentiment_pairs(4))
    argv = ["dpo", "--model", base_model, "--data", data, "--output-dir", str(tmp_path / "out"), *flags]
    loaded = []
    monkeypatch.setattr("fastppo.models.load_pretrained", lambda *a, **k: loaded.append(a))
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not loaded and not (tmp_path / "out").exists()


def test_pairs_without_a_preference_are_refused_all_or_dropped_counted(tmp_path, base_model, capsys):
    """chosen == rejected: the loss is log 2 whatever the policy, its gradient zero. Every pair so: exit 2 naming the
    first one's file:line (no run at loss 0.693); some: dropped and counted."""
    pairs = sentiment_pairs(8)
    ties = [{**p, "rejected": p["chosen"]} for p in pairs]
    data = write_jsonl(tmp_path / "ties.jsonl", ties)
    argv = ["dpo", "--model", base_model, "--data", data, "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 2
    assert f"{data}:1: chosen and rejected are the same text, in every one of the 8 pairs" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    trainer = DPOTrainer(config(tmp_path, base_model, data=pairs[:6] + ties[6:], eval_fraction=0.0))
    assert len(trainer.train_data) == 6
    assert "2 of 8 pairs have chosen == rejected (the first at data[6]): dropped" in capsys.readouterr().out


def test_pairs_max_length_empties_are_counted(tmp_path, base_model, capsys):
    pairs = sentiment_pairs(8)
    long = [{**p, "prompt": " ".join([p["prompt"]] * 20)} for p in pairs[:3]]  # its prompt fills max_length
    trainer = DPOTrainer(config(tmp_path, base_model, data=long + pairs[3:], eval_fraction=0.0))
    assert len(trainer.train_data) == 5
    out = capsys.readouterr().out
    assert "3 of 8 training pairs dropped: their prompt fills max_length=32" in out and "(the first: data[" in out


# ----------------------------------------------------------------------------------------------
# the demo task: does DPO improve what the hidden gold function measures?
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dpo_raises_held_out_gold_reward_over_the_sft_policy(tmp_path):
    """A short SFT (seconds), then DPO on gold-labelled pairs; the held-out answers are scored by gold."""
    from fastppo.demo import pipeline, task
    from fastppo.demo.dpo_stage import DPOSettings, run_dpo_on_demo
    from fastppo.demo.tokenizer import build_tokenizer
    from fastppo.stages.sft import train_sft

    tokenizer = build_tokenizer()
    sft_dir = str(tmp_path / "sft")
    train_sft(
        pipeline.build_policy(tokenizer, seed=0),
        tokenizer,
        task.sft_corpus(2000, seed=0),
        epochs=2.0,
        batch_size=32,
        learning_rate=6e-3,
        max_length=64,
        output_dir=sft_dir,
        log=lambda _: None,
    )
    pairs = task.preference_pairs(2000, seed=1)
    result = run_dpo_on_demo(str(tmp_path / "dpo"), sft_dir, pairs, DPOSettings(eval_samples_per_prompt=2))
    sft, dpo = result["sft"], result["dpo"]
    assert dpo["gold"] - sft["gold"] > 0.5, f"gold {sft['gold']:+.2f} -> {dpo['gold']:+.2f}"
    assert 0 < dpo["kl"] < 20 and sft["kl"] == pytest.approx(0, abs=1e-4)  # the reference is the SFT policy
    assert result["train"]["eval/rewards_accuracy"] > 0.6 and result["train"]["eval/rewards_margin"] > 0
    assert os.path.isfile(os.path.join(result["checkpoint"], "model.safetensors"))


@pytest.mark.parametrize("micro", [{"micro_batch_size": 3}, {"micro_batch_tokens": 40}])
def test_micro_batches_accumulate_the_whole_batch_step(tmp_path, base_model, monkeypatch, micro):
    """Pairs of different lengths in length-sorted micro-batches: the step's gradient and every logged statistic
    (means over the step's pairs) are the whole batch's."""
    import fastppo.stages.dpo as dpo
    from tests.stages.test_sft import recorded_steps

    pairs = sentiment_pairs(8, seed=2)
    pairs[1]["chosen"] += " and the kitten is good and the storm is calm and bright"
    results = []
    for name, options in (("whole", {}), ("micro", micro)):
        steps = recorded_steps(monkeypatch, dpo)
        trainer = DPOTrainer(
            config(tmp_path / name, base_model, data=pairs, batch_size=8, eval_fraction=0.0, kl_samples=0, **options)
        )
        metrics = trainer.step()
        results.append((metrics, steps[0]))
        monkeypatch.undo()
    (whole, grads), (parts, micro_grads) = results
    # (rewards/accuracy counts margins > 0: at step 1 the policy is the reference and every margin is 0 up to rounding)
    for key in ("policy/loss", "rewards/chosen", "rewards/margin", "logps/chosen", "logps/rejected"):
        assert parts[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-7), key
    assert grads.keys() == micro_grads.keys() and grads
    for key, grad in grads.items():
        torch.testing.assert_close(micro_grads[key], grad, atol=1e-6, rtol=1e-4, msg=key)
