import errno
import json
import os
import shutil
import subprocess

import pytest
import torch

from fastppo import PPOTrainer
from fastppo.runtime import checkpoint
from fastppo.runtime.checkpoint import find_resumable, verify
from fastppo.runtime.errors import EnvironmentProblem, InputError
from tests.tiny_models import count_w7, prompt_list, small_config


@pytest.fixture
def run_with_checkpoints(tiny_models, tmp_path):
    config = small_config(tmp_path, policy_model=tiny_models["llama"][0], steps=2, save_every=1)
    PPOTrainer(config, reward=count_w7, prompts=prompt_list()).train()
    return tmp_path / "run"


def test_checkpoints_are_complete_and_verified(run_with_checkpoints):
    for step in (1, 2):
        checkpoint = run_with_checkpoints / f"checkpoint-{step}"
        assert verify(str(checkpoint)) is None
        assert {"manifest.json", "trainer_state.pt", "value_head.safetensors", "config.json"} <= set(
            os.listdir(checkpoint)
        )
    assert not [p for p in os.listdir(run_with_checkpoints) if p.startswith(".tmp")]
    assert find_resumable(str(run_with_checkpoints)).endswith("checkpoint-2")


def test_damaged_checkpoint_falls_back_to_the_previous(run_with_checkpoints):
    weights = run_with_checkpoints / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    assert "checksum" in verify(str(run_with_checkpoints / "checkpoint-2"))
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        assert find_resumable(str(run_with_checkpoints)).endswith("checkpoint-1")
    os.remove(run_with_checkpoints / "checkpoint-1" / "manifest.json")
    with pytest.raises(InputError, match="no valid checkpoint"), pytest.warns(UserWarning):
        find_resumable(str(run_with_checkpoints))


def test_fresh_run_refuses_to_overwrite_checkpoints(run_with_checkpoints, tiny_models, tmp_path):
    config = small_config(tmp_path, policy_model=tiny_models["llama"][0])
    before = sorted(os.listdir(run_with_checkpoints))
    with pytest.raises(InputError, match="already holds checkpoints"):
        PPOTrainer(config, reward=count_w7, prompts=prompt_list())
    assert sorted(os.listdir(run_with_checkpoints)) == before


def test_resuming_another_runs_checkpoint_refuses_an_output_dir_with_a_run(run_with_checkpoints, tiny_models, tmp_path):
    """A checkpoint of run A resumed into run B's directory would write over B: refused, B untouched."""
    other = tmp_path / "other"
    config = small_config(other, policy_model=tiny_models["llama"][0], steps=1)
    PPOTrainer(config, reward=count_w7, prompts=prompt_list()).train()
    before = {p: (other / "run" / p).stat().st_mtime_ns for p in os.listdir(other / "run")}
    resume = small_config(
        other, policy_model=tiny_models["llama"][0], steps=3, resume_from=str(run_with_checkpoints / "checkpoint-1")
    )
    with pytest.raises(InputError, match="another run's"):
        PPOTrainer(resume, reward=count_w7, prompts=prompt_list())
    assert {p: (other / "run" / p).stat().st_mtime_ns for p in os.listdir(other / "run")} == before
    # into a new directory it is a new run that starts from that checkpoint
    fresh = small_config(
        tmp_path / "fresh",
        policy_model=tiny_models["llama"][0],
        steps=3,
        resume_from=str(run_with_checkpoints / "checkpoint-1"),
    )
    assert PPOTrainer(fresh, reward=count_w7, prompts=prompt_list()).step_count == 1


def test_overwrite_removes_the_previous_runs_checkpoints(run_with_checkpoints, tiny_models, tmp_path):
    """Starting over with overwrite_output_dir: a later --resume must find the new run's checkpoint, not the old
    run's newer one."""
    config = small_config(tmp_path, policy_model=tiny_models["llama"][0], steps=1, overwrite_output_dir=True)
    PPOTrainer(config, reward=count_w7, prompts=prompt_list()).train()
    assert sorted(p for p in os.listdir(run_with_checkpoints) if p.startswith("checkpoint")) == ["checkpoint-1"]
    resumed = small_config(
        tmp_path, policy_model=tiny_models["llama"][0], steps=2, resume_from=str(run_with_checkpoints)
    )
    assert PPOTrainer(resumed, reward=count_w7, prompts=prompt_list()).step_count == 1


@pytest.mark.parametrize(
    "changed, named",
    [
        ({"lora_rank": 4}, "lora_rank 0 -> 4"),
        ({"advantage_estimator": "grpo", "samples_per_prompt": 2}, "critic 'shared' -> 'none'"),
        ({"critic": "separate"}, "critic 'shared' -> 'separate'"),
    ],
)
def test_resume_refuses_settings_that_change_the_model(run_with_checkpoints, tiny_models, tmp_path, changed, named):
    resume = str(run_with_checkpoints)
    config = small_config(tmp_path, policy_model=tiny_models["llama"][0], steps=3, resume_from=resume, **changed)
    with pytest.raises(InputError, match=named):
        PPOTrainer(config, reward=count_w7, prompts=prompt_list())


def test_resume_warns_about_settings_the_checkpoint_overrides(run_with_checkpoints, tiny_models, tmp_path):
    resume = str(run_with_checkpoints)
    config = small_config(
        tmp_path, policy_model=tiny_models["llama"][0], steps=3, resume_from=resume, learning_rate=1e-6
    )
    with pytest.warns(UserWarning, match="learning_rate: 1e-06 has no effect on resume"):
        trainer = PPOTrainer(config, reward=count_w7, prompts=prompt_list())
    assert trainer.optimizer.param_groups[0]["lr"] != 1e-6


def test_resume_into_another_architecture_names_the_checkpoint(run_with_checkpoints, tiny_models, tmp_path):
    config = small_config(
        tmp_path, policy_model=tiny_models["qwen2"][0], steps=3, resume_from=str(run_with_checkpoints)
    )
    with pytest.raises(InputError, match="policy_model: .* holds other weights"):
        PPOTrainer(config, reward=count_w7, prompts=prompt_list())
    config.resume_new_reference = True
    with pytest.raises(InputError, match="cannot load the weights"):
        PPOTrainer(config, reward=count_w7, prompts=prompt_list())


# --- resume: what changed since the checkpoint is refused, or honoured and said ---------------------------------


def resume(tmp_path, run_dir, policy, capsys=None, **changes):
    config = small_config(tmp_path, policy_model=policy, steps=3, resume_from=str(run_dir), **changes)
    trainer = PPOTrainer(config, reward=count_w7, prompts=changes.pop("prompts", None) or prompt_list())
    return trainer, (capsys.readouterr().err if capsys else "")


def test_another_reference_is_refused_unless_accepted(run_with_checkpoints, tiny_models, tmp_path, capsys):
    """Another checkpoint of the same architecture as policy_model would change the KL reference (KL 0 -> 30 nats at
    the next step); its weights' digest tells, its config does not."""
    other = str(run_with_checkpoints / "checkpoint-1")  # a llama too: trained for a step
    with pytest.raises(InputError, match=r"policy_model: .*checkpoint-1 holds other weights .* resume_new_reference"):
        resume(tmp_path, run_with_checkpoints, other)
    trainer, err = resume(tmp_path, run_with_checkpoints, other, capsys, resume_new_reference=True)
    assert trainer.step_count == 2 and "the KL is measured against" in err
    moved = shutil.copytree(tiny_models["llama"][0], tmp_path / "moved")  # the same files elsewhere: the same model
    trainer, err = resume(tmp_path, run_with_checkpoints, str(moved), capsys)
    assert trainer.step_count == 2 and "the same weights" in err


def test_changed_kl_coef_and_seed_are_honoured_and_said(run_with_checkpoints, tiny_models, tmp_path, capsys):
    saved = torch.load(run_with_checkpoints / "checkpoint-2" / "trainer_state.pt", weights_only=True)
    trainer, err = resume(tmp_path, run_with_checkpoints, tiny_models["llama"][0], capsys, kl_coef=0.3, seed=5)
    assert trainer.kl_controller.value == 0.3 and "kl_coef 0.05 -> 0.3" in err
    assert "seed 0 -> 5" in err
    assert (trainer.sampler.seed, trainer.sampler.epoch, trainer.sampler.position) == (
        5,
        saved["sampler"]["epoch"] + 1,
        0,
    )


@pytest.mark.parametrize("count", [24, 20], ids=["same-size", "other-size"])
def test_other_prompts_are_honoured_with_a_warning_naming_them(
    run_with_checkpoints, tiny_models, tmp_path, capsys, count
):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompt_list(count, seed=9)))
    trainer, err = resume(tmp_path, run_with_checkpoints, tiny_models["llama"][0], capsys, prompts=str(prompts))
    assert f"warning: prompts {prompts} are not those" in err and f"now {count}, digest" in err
    assert trainer.sampler.n_prompts == count and trainer.sampler.position == 0
    assert trainer.step()  # and it trains on


def test_resume_of_a_run_that_saved_nothing_starts_fresh(tiny_models, tmp_path, capsys):
    """A job preempted before its first checkpoint: --resume (resume_from = output_dir) starts over, saying so,
    whether the directory is missing or holds the killed run's metrics."""
    run_dir = tmp_path / "run"
    for leftover in (None, '{"step": 1}\n'):
        if leftover:
            run_dir.mkdir(exist_ok=True)
            (run_dir / "metrics.jsonl").write_text(leftover)
        config = small_config(tmp_path, policy_model=tiny_models["llama"][0], steps=1, resume_from=str(run_dir))
        trainer = PPOTrainer(config.validate(), reward=count_w7, prompts=prompt_list())
        assert trainer.step_count == 0
        assert f"no checkpoint in {run_dir} yet: starting a fresh run" in capsys.readouterr().out
    trainer.train()
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1]


# --- saves that meet a full disk, and what killed saves leave behind ---------------------------------------------


def enospc_after_writing(obj, path, *args, **kwargs):
    """torch.save on a disk that fills up: some bytes written, then ENOSPC."""
    with open(path, "wb") as f:
        f.write(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_stops_the_run_with_exit_4_keeping_the_last_checkpoint(
    run_with_checkpoints, tiny_models, tmp_path, monkeypatch
):
    trainer, _ = resume(tmp_path, run_with_checkpoints, tiny_models["llama"][0])
    trainer.step()
    monkeypatch.setattr(torch, "save", enospc_after_writing)
    with pytest.raises(EnvironmentProblem, match=r"disk full: checkpoint-3 in .*run needs about \d+ MiB, \d+ MiB free"):
        trainer.save()
    left = sorted(os.listdir(run_with_checkpoints))
    assert [n for n in left if n.startswith(("checkpoint", ".tmp"))] == ["checkpoint-1", "checkpoint-2"]
    assert verify(str(run_with_checkpoints / "checkpoint-2")) is None


def test_not_enough_free_space_is_said_before_writing(run_with_checkpoints, tiny_models, tmp_path, monkeypatch):
    trainer, _ = resume(tmp_path, run_with_checkpoints, tiny_models["llama"][0])
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 30, 1 << 30, 4096))
    with pytest.raises(EnvironmentProblem, match=r"checkpoint-2 .* 0 MiB free; not written, the last checkpoint, .*"):
        trainer.save()
    assert not [n for n in os.listdir(run_with_checkpoints) if n.startswith(".tmp")]


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mounted at tmp_path/disk (root only): its size set with `resize(bytes)`."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)]).returncode:
        pytest.skip("needs root and tmpfs to mount a small disk")

    def resize(size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)

    yield disk, resize
    subprocess.run(["umount", "-l", str(disk)])


@pytest.mark.parametrize("full_in", ["safetensors", "torch.save"])
def test_a_real_full_disk_during_a_save(small_disk, tiny_models, monkeypatch, full_in):
    """A tmpfs that fills up inside the writers (safetensors' Rust, torch.save's C++ stream): exit 4's message, the
    partial directory removed, the checkpoint before it whole."""
    disk, resize = small_disk
    config = small_config(disk, policy_model=tiny_models["llama"][0], steps=2)
    trainer = PPOTrainer(config, reward=count_w7, prompts=prompt_list())
    trainer.step()
    first = trainer.save()
    trainer.step()
    files = {name: os.path.getsize(os.path.join(first, name)) for name in os.listdir(first)}
    state = files["trainer_state.pt"]
    room = 64 << 10 if full_in == "safetensors" else sum(files.values()) - state // 2 + (64 << 10)
    resize(shutil.disk_usage(disk).used + room)  # room for a part of the next checkpoint
    monkeypatch.setattr(checkpoint, "_checkpoint_bytes", lambda *args: 1)  # past the check before writing
    with pytest.raises(
        EnvironmentProblem,
        match=rf"disk full: checkpoint-2 .*; the partial checkpoint was removed, the last checkpoint, {first}, is",
    ):
        trainer.save()
    assert sorted(os.listdir(disk / "run")) == [".fastppo.lock", "checkpoint-1", "metrics.jsonl"]
    assert verify(first) is None


def test_partial_checkpoints_of_dead_processes_are_removed_at_start(
    run_with_checkpoints, tiny_models, tmp_path, capsys
):
    """A SIGKILL inside a save leaves `.tmp-checkpoint-<step>-<pid>`; one that came between moving an old checkpoint
    of the same step aside and renaming the new one leaves `checkpoint-<step>.old-<pid>`: put back."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    (run_with_checkpoints / f".tmp-checkpoint-3-{dead.pid}").mkdir()
    (run_with_checkpoints / f".tmp-checkpoint-3-{os.getppid()}").mkdir()  # alive: somebody's save, not touched
    os.replace(run_with_checkpoints / "checkpoint-1", run_with_checkpoints / f"checkpoint-1.old-{dead.pid}")
    resume(tmp_path, run_with_checkpoints, tiny_models["llama"][0])
    left = sorted(n for n in os.listdir(run_with_checkpoints) if "checkpoint" in n)
    assert left == [f".tmp-checkpoint-3-{os.getppid()}", "checkpoint-1", "checkpoint-2"]
    assert f"removed .tmp-checkpoint-3-{dead.pid}" in capsys.readouterr().err


def test_a_resumed_run_keeps_the_precision_auto_chose_at_its_start(tiny_models, tmp_path, monkeypatch, capsys):
    """precision auto is a timing on a CPU: a resume must not switch precision halfway, whatever its probe says."""
    from fastppo.runtime import precision

    policy = tiny_models["llama"][0]
    for chose in (True, False):
        run = tmp_path / str(chose)
        monkeypatch.setattr(precision, "bf16_pays_on_cpu", lambda model, chose=chose: chose)
        config = small_config(run, policy_model=policy, steps=1, device="cpu", save_every=1)
        assert (PPOTrainer(config, reward=count_w7, prompts=prompt_list()).autocast_dtype is not None) is chose
        PPOTrainer(config, reward=count_w7, prompts=prompt_list()).train()
        monkeypatch.setattr(precision, "bf16_pays_on_cpu", lambda model, chose=chose: not chose)  # the probe flips
        resumed = small_config(run, policy_model=policy, steps=2, device="cpu", resume_from=str(run / "run"))
        trainer = PPOTrainer(resumed, reward=count_w7, prompts=prompt_list())
        assert (trainer.autocast_dtype is not None) is chose
        said = f"precision auto: {'bf16' if chose else 'float32'}, as the run chose at its start"
        assert said in capsys.readouterr().err
        explicit = small_config(run, policy_model=policy, steps=2, precision="float32", resume_from=str(run / "run"))
        assert PPOTrainer(explicit, reward=count_w7, prompts=prompt_list()).autocast_dtype is None  # asked: honoured


def test_a_resume_refuses_another_lora_alpha(tiny_llama, tmp_path):
    """The adapters' scale (alpha / rank) is part of the model the checkpoint holds: another one is refused, not
    loaded at a new scale."""
    common = dict(policy_model=tiny_llama[0], steps=1, lora_rank=4, device="cpu")
    PPOTrainer(small_config(tmp_path, **common), reward=count_w7, prompts=prompt_list()).train()
    resumed = small_config(tmp_path, **{**common, "steps": 2, "lora_alpha": 64.0}, resume_from=str(tmp_path / "run"))
    with pytest.raises(InputError, match="lora_alpha"):
        PPOTrainer(resumed, reward=count_w7, prompts=prompt_list())
