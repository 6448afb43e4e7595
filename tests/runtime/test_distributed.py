"""Two processes (gloo, on the CPU) against one: under DDP and FSDP2, one PPO iteration on a fixed rollout batch of
8 sequences, 4 per rank, holds the same weights and logs the same metrics as a single process on all 8; checkpoints
move between world sizes.

The rollout is fixed (`trainer.rollout` replaced), so nothing depends on the ranks' sampling. Everything after it
runs for real: reward normalization, whitening, the losses' global denominators, gradient reduction and clipping,
two PPO epochs (the second one clips: clip fractions are not trivially 0), the adaptive KL controller, the metrics.
Rank 0's rows are short and rank 1's long, so a per-rank token count would weight them differently and fail.

Tolerance: weights within atol 2e-6 + rtol 1e-5 of the single process (float32, summation order differs); the
metrics within rel 1e-4 (abs 1e-6).
"""

from __future__ import annotations

import json
import math
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from fastppo.ppo.batch import RolloutBatch, plan_micro_batches
from fastppo.runtime import distributed
from tests.tiny_models import WORDS, build_tokenizer, count_w7, prompt_list, small_config

WORLD, N = 2, 8  # processes, sequences in the global batch
LENGTHS = [1, 2, 2, 3, 6, 5, 6, 4]  # response lengths: rank 0 gets the first 4 rows, rank 1 the last 4
COMPARED = [
    "policy/loss",
    "value/loss",
    "policy/clip_frac",
    "value/clip_frac",
    "policy/approx_kl",
    "policy/entropy",
    "policy/kl",
    "kl/coef",
    "optim/grad_norm",
    "reward/score_mean",
    "reward/score_std",
    "reward/shaped_mean",
    "value/explained_variance",
    "rollout/response_length_mean",
    "rollout/response_length_max",
    "rollout/ended_rate",
    "rollout/truncated_rate",
]


def fixed_batch() -> RolloutBatch:
    """The global rollout batch: deterministic prompts and responses (often 'w7', which the reward counts)."""
    from fastppo.data import tokenize_prompts
    from fastppo.engines.hf import decode_responses

    tokenizer = build_tokenizer()
    prompts = prompt_list(N, seed=3)
    prompt_ids, prompt_mask = tokenize_prompts(prompts, tokenizer, 16)
    g = torch.Generator().manual_seed(1)
    words = torch.tensor(tokenizer.convert_tokens_to_ids(WORDS[5:10]))  # w5..w9
    response_ids = torch.full((N, max(LENGTHS)), tokenizer.pad_token_id)
    response_mask = torch.zeros((N, max(LENGTHS)), dtype=torch.long)
    ended = torch.tensor([i % 3 != 0 for i in range(N)])
    for i, length in enumerate(LENGTHS):
        response_ids[i, :length] = words[torch.randint(0, len(words), (length,), generator=g)]
        if ended[i]:
            response_ids[i, length - 1] = tokenizer.eos_token_id
        response_mask[i, :length] = 1
    responses = decode_responses(tokenizer, response_ids, response_mask)
    return RolloutBatch(prompt_ids, prompt_mask, response_ids, response_mask, ended, prompts, responses)


def rank_share(batch: RolloutBatch, rank: int) -> RolloutBatch:
    """Rank `rank`'s rows, trimmed as its own rollout would be: prompt padding and response length its own."""
    share = batch.select(torch.arange(rank * N // WORLD, (rank + 1) * N // WORLD))
    P = int(share.prompt_mask.sum(-1).max())
    T = int(share.response_mask.sum(-1).max())
    share.prompt_ids, share.prompt_mask = share.prompt_ids[:, -P:], share.prompt_mask[:, -P:]
    share.response_ids, share.response_mask = share.response_ids[:, :T], share.response_mask[:, :T]
    return share


def config(tmp_path, policy, **overrides):
    values = dict(
        policy_model=policy,
        steps=1,
        rollout_batch_size=N,
        mini_batch_size=N,
        micro_batch_size=2,
        ppo_epochs=2,
        reward_normalization=True,
        adaptive_kl_target=1.0,
        max_new_tokens=6,
        clip_range=0.005,
        clip_range_value=0.005,
    )
    return small_config(tmp_path, **{**values, **overrides})


def one_step(trainer, batch: RolloutBatch) -> dict:
    trainer.rollout = lambda prompts: batch  # the fixed batch instead of sampling
    return trainer.step()


def _worker(rank: int, port: int, policy: str, tmp: str, single_checkpoint: str) -> None:
    """One of the two ranks: what torchrun's environment would give it, then the DDP and FSDP2 runs."""
    from fastppo import PPOTrainer

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    share = rank_share(fixed_batch(), rank)
    for parallel in ("ddp", "fsdp"):
        trainer = PPOTrainer(
            config(_Path(tmp) / parallel, policy, parallel=parallel), reward=count_w7, prompts=prompt_list()
        )
        assert trainer.parallel.mode == parallel
        one_step(trainer, share)
        state = trainer.parallel.full_state_dict(trainer.model)  # collective: every rank
        trainer.save()  # gathered, written by rank 0
        if rank == 0:
            torch.save(state, os.path.join(tmp, f"{parallel}.pt"))
    # A checkpoint of the single process, resumed on 2 ranks under FSDP2: weights and optimizer state carried over.
    resumed = PPOTrainer(
        config(_Path(tmp) / "resumed", policy, parallel="fsdp", resume_from=single_checkpoint),
        reward=count_w7,
        prompts=prompt_list(),
    )
    state = resumed.parallel.full_state_dict(resumed.model)
    optimizer = resumed.parallel.optimizer_state_dict(resumed.model, resumed.optimizer)
    if rank == 0:
        torch.save({"model": state, "optimizer": optimizer, "step": resumed.step_count}, f"{tmp}/resumed.pt")
    torch.distributed.barrier()  # neither rank leaves while the other still talks to it
    torch.distributed.destroy_process_group()


CRITIC_FREE = dict(advantage_estimator="reinforce++-baseline", samples_per_prompt=2, kl_loss_coef=0.1)
CRITIC_FREE_COMPARED = [
    "policy/loss",
    "policy/clip_frac",
    "policy/approx_kl",
    "policy/ref_kl",
    "policy/kl",
    "optim/grad_norm",
    "reward/shaped_mean",
]


# Rank 0's short rows fit one micro-batch of 36 tokens, rank 1's long ones need two: under FSDP rank 0 splits its
# own in two (each forward gathers the weights on both ranks), and the step is still the single process's.
TOKEN_BUDGET = dict(micro_batch_size=None, micro_batch_tokens=36)


def _critic_free_worker(rank: int, port: int, policy: str, tmp: str) -> None:
    """A rank of the critic-free run: group means from the groups on this rank, whitening over both ranks."""
    from fastppo import PPOTrainer

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    for parallel, budget in (("ddp", {}), ("fsdp", TOKEN_BUDGET)):
        trainer = PPOTrainer(
            config(_Path(tmp) / parallel, policy, parallel=parallel, **CRITIC_FREE, **budget),
            reward=count_w7,
            prompts=prompt_list(),
        )
        one_step(trainer, rank_share(fixed_batch(), rank))
        state = trainer.parallel.full_state_dict(trainer.model)  # collective: every rank
        if rank == 0:
            torch.save(state, os.path.join(tmp, f"critic_free_{parallel}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


class _Path(str):
    """tmp_path's `/` for a plain string path (what the spawned workers receive)."""

    def __truediv__(self, other):
        return _Path(os.path.join(self, other))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(args: tuple, timeout: float = 240.0, worker=_worker) -> None:
    """Run `worker` on WORLD processes; a worker's exception fails the test, a hang times out."""
    context = mp.start_processes(worker, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} workers did not finish in {timeout} s")


def _metrics_lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def test_two_ranks_take_the_single_process_step(tiny_models, tmp_path, monkeypatch):
    from fastppo import PPOTrainer

    policy = tiny_models["llama"][0]
    single = PPOTrainer(config(tmp_path / "single", policy), reward=count_w7, prompts=prompt_list())
    before = {k: v.clone() for k, v in single.model.state_dict().items()}
    expected = one_step(single, fixed_batch())
    single_checkpoint = single.save()
    for name in ("policy/clip_frac", "value/clip_frac", "value/loss"):
        assert expected[name] > 1e-3, name  # the comparison means something

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    _spawn((_free_port(), policy, str(tmp_path), single_checkpoint))

    weights = single.model.state_dict()
    assert any(not torch.equal(weights[k], before[k]) for k in weights)  # the step moved the weights
    for parallel in ("ddp", "fsdp"):
        state = torch.load(tmp_path / f"{parallel}.pt", weights_only=True)
        assert state.keys() == weights.keys()
        for name, value in weights.items():
            torch.testing.assert_close(state[name], value, atol=2e-6, rtol=1e-5, msg=f"{parallel}: {name}")
        lines = _metrics_lines(tmp_path / parallel / "run")
        assert len(lines) == 1  # rank 0 alone writes
        for name in COMPARED:
            assert math.isfinite(lines[0][name]), name
            assert lines[0][name] == pytest.approx(expected[name], rel=1e-4, abs=1e-6), f"{parallel}: {name}"

    # The FSDP2 checkpoint (2 ranks) resumes in one process: the HF weights and the optimizer state by name.
    fsdp_checkpoint = tmp_path / "fsdp" / "run" / "checkpoint-1"
    assert (fsdp_checkpoint / "model.safetensors").exists()
    resumed = PPOTrainer(
        config(tmp_path / "one", policy, resume_from=str(fsdp_checkpoint)), reward=count_w7, prompts=prompt_list()
    )
    fsdp_state = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    for name, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, fsdp_state[name], atol=0, rtol=0, msg=name)
    saved = torch.load(fsdp_checkpoint / "trainer_state.pt", weights_only=True)["optimizer"]
    _assert_same_optimizer_state(distributed._keyed_by_name(resumed.model, resumed.optimizer.state_dict()), saved)
    assert resumed.step() and resumed.step_count == 2  # and it trains on

    # The single process's checkpoint, resumed on 2 ranks under FSDP2.
    carried = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert carried["step"] == 1
    for name, value in weights.items():
        torch.testing.assert_close(carried["model"][name], value, atol=0, rtol=0, msg=name)
    _assert_same_optimizer_state(
        carried["optimizer"], distributed._keyed_by_name(single.model, single.optimizer.state_dict())
    )


def test_two_ranks_take_the_single_process_critic_free_step(tiny_models, tmp_path, monkeypatch):
    """reinforce++-baseline with the KL in the loss: each rank's groups (2 of the 4) give their own means, the
    whitening is global, and the result is the single process's step, under DDP, and under FSDP2 with micro-batches
    cut by a token budget (as many on each rank)."""
    from fastppo import PPOTrainer

    policy = tiny_models["llama"][0]
    single = PPOTrainer(config(tmp_path / "single", policy, **CRITIC_FREE), reward=count_w7, prompts=prompt_list())
    expected = one_step(single, fixed_batch())
    assert expected["policy/clip_frac"] > 1e-3 and expected["policy/ref_kl"] > 0  # the comparison means something
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    _spawn((_free_port(), policy, str(tmp_path)), worker=_critic_free_worker)
    shares = [rank_share(fixed_batch(), rank) for rank in range(WORLD)]
    budget = (TOKEN_BUDGET["micro_batch_size"] or N // WORLD, TOKEN_BUDGET["micro_batch_tokens"])
    planned = [plan_micro_batches(share, torch.arange(N // WORLD), *budget, single.overhead) for share in shares]
    assert [len(chunks) for chunks in planned] == [1, 2]  # as the trainer cuts them on a CPU
    for parallel in ("ddp", "fsdp"):
        state = torch.load(tmp_path / f"critic_free_{parallel}.pt", weights_only=True)
        assert single.model.value_head is None and state.keys() == single.model.state_dict().keys()
        for name, value in single.model.state_dict().items():
            torch.testing.assert_close(state[name], value, atol=2e-6, rtol=1e-5, msg=f"{parallel}: {name}")
        (line,) = _metrics_lines(tmp_path / parallel / "run")
        for name in CRITIC_FREE_COMPARED:
            assert line[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-6), f"{parallel}: {name}"


def _assert_same_optimizer_state(a: dict, b: dict) -> None:
    assert a["state"].keys() == b["state"].keys() and a["state"]
    for name, state in a["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(value, b["state"][name][key], atol=0, rtol=0, msg=f"{name} {key}")


def test_config_checks_the_shares(tmp_path, monkeypatch):
    from fastppo.runtime.errors import InputError

    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(InputError, match=r"rollout_batch_size \(4\) must be a multiple of the number of processes"):
        small_config(tmp_path, rollout_batch_size=4, mini_batch_size=4, micro_batch_size=None).validate()
    with pytest.raises(InputError, match="parallel: 'none' runs one process"):
        small_config(tmp_path, parallel="none", rollout_batch_size=6, mini_batch_size=6).validate()
    with pytest.raises(InputError, match=r"micro_batch_size \(4\) must divide mini_batch_size / processes \(2\)"):
        small_config(tmp_path, rollout_batch_size=6, mini_batch_size=6, micro_batch_size=4).validate()
    small_config(tmp_path, parallel="fsdp", rollout_batch_size=6, mini_batch_size=6, micro_batch_size=2).validate()
    monkeypatch.delenv("WORLD_SIZE")
    small_config(tmp_path, parallel="none").validate()  # one process: any mode


def test_single_process_helpers_are_the_identity():
    x, mask = torch.randn(3, 5), torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    assert distributed.world_size() == 1 and distributed.is_main()
    assert distributed.all_gather_rows(x) is x and distributed.share([1, 2, 3]) == [1, 2, 3]
    assert distributed.global_counts(mask) == (7.0, 2.0)
    from fastppo import ops

    torch.testing.assert_close(distributed.masked_whiten(x, mask), ops.masked_whiten(x, mask), atol=0, rtol=0)


def test_fastppo_train_nproc_runs_torchrun(tiny_models, tmp_path):
    """`fastppo train --nproc 2` end to end with FSDP2 and real sampling (generation with gathered weights), an
    evaluation whose 3 prompts the two ranks share, the completions table and the final model; the moves between
    world sizes are checked above, the launcher in test_launcher.py."""
    from tests.tiny_models import run_cli, tiny_run_yaml

    policy, reward = tiny_models["llama"]
    eval_prompts = ["w1 w2", "w3", "w4 w5 w6"]
    sizes = {"steps": 1, "rollout_batch_size": 4, "mini_batch_size": 4, "micro_batch_size": 1, "max_new_tokens": 4}
    outputs = {"eval_prompts": eval_prompts, "eval_every": 1, "log_completions": True, "num_completions_to_print": 0}
    path = tiny_run_yaml(tmp_path, policy, reward_model=reward, parallel="fsdp", **sizes, **outputs)
    proc = run_cli("train", "--nproc", "2", "--config", path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: 1 steps") == 1  # rank 0 reports
    assert len(_metrics_lines(tmp_path / "run")) == 1  # rank 0 writes
    assert (tmp_path / "run" / "checkpoint-1" / "manifest.json").exists()
    assert "eval/kl" in _metrics_lines(tmp_path / "run")[0]
    completions = [json.loads(line) for line in open(tmp_path / "run" / "completions.jsonl")]
    assert [row["split"] for row in completions] == ["train"] * 4 + ["eval"] * 3  # every rank's rows, once each
    assert [row["prompt"] for row in completions[4:]] == eval_prompts
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()  # gathered from the shards by rank 0


def test_nproc_is_checked_before_any_process_starts(tmp_path, capsys):
    from fastppo.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(f"rollout_batch_size: 4\nmini_batch_size: 4\noutput_dir: {tmp_path / 'run'}\n")
    assert main(["train", "--nproc", "3", "--config", str(path)]) == 2
    assert "rollout_batch_size (4) must be a multiple of the number of processes (3)" in capsys.readouterr().err
    assert main(["train", "--nproc", "2"]) == 2  # the demo is one process
    assert not (tmp_path / "run").exists()
