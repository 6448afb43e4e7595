"""`precision`: which forwards autocast, and the CPU check `fastppo doctor` reports."""

import pytest
import torch

from fastppo.runtime import precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    "choice, device, expected",
    [
        ("auto", CPU, None),
        ("auto", CUDA, torch.bfloat16),
        ("float32", CUDA, None),
        ("float32", CPU, None),
        ("bf16", CPU, torch.bfloat16),
        ("bf16", CUDA, torch.bfloat16),
    ],
)
def test_autocast_dtype(choice, device, expected):
    assert precision.autocast_dtype(choice, device) is expected


def test_the_autocast_context_runs_matmuls_in_its_dtype():
    x = torch.randn(3, 5)
    with precision.autocast(CPU, None):
        assert (x @ x.T).dtype == torch.float32
    with precision.autocast(CPU, torch.bfloat16):
        assert (x @ x.T).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "flags, expected",
    [
        ("fpu avx512f avx512_vnni", False),
        ("fpu avx512f avx512_bf16 avx512_vnni", True),
        ("fpu amx_bf16 amx_tile", True),
        ("fpu avx2 avx_vnni", False),
    ],
)
def test_cpu_multiplies_bf16_reads_the_flags(tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n"
    )
    assert precision.cpu_multiplies_bf16(str(cpuinfo)) is expected
    assert precision.cpu_multiplies_bf16(str(tmp_path / "missing")) is False


def test_doctor_says_whether_bf16_pays_on_this_cpu(capsys):
    from fastppo.cli import main

    assert main(["doctor", "--device", "cpu"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("cpu bf16"))
    assert ("native" in line) is precision.cpu_multiplies_bf16(), line


@pytest.mark.parametrize("choice, expected", [("auto", None), ("float32", None), ("bf16", torch.bfloat16)])
def test_the_vllm_engine_computes_in_the_trainers_dtype(monkeypatch, tiny_models, tmp_path, choice, expected):
    from fastppo.engines import vllm as vllm_engine
    from fastppo.ppo.trainer import PPOTrainer
    from tests.tiny_models import count_w7, prompt_list, small_config

    seen = {}
    monkeypatch.setattr(vllm_engine, "check_available", lambda: "0.32.0")
    monkeypatch.setattr(vllm_engine, "build_engine", lambda policy, config, device, dtype: seen.update(dtype=dtype))
    monkeypatch.setattr(precision, "bf16_pays_on_cpu", lambda model: False)
    config = small_config(tmp_path, policy_model=tiny_models["llama"][0], precision=choice, rollout_engine="vllm")
    trainer = PPOTrainer(config, reward=count_w7, prompts=prompt_list())
    assert seen["dtype"] is expected and trainer.autocast_dtype is expected


class _Body(torch.nn.Module):
    """Linear layers of 64 x 300 and 300 x 64 (38,400 parameters) and an LM head of 900 x 64."""

    def __init__(self):
        super().__init__()
        self.up, self.down, self.head = torch.nn.Linear(64, 300), torch.nn.Linear(300, 64), torch.nn.Linear(64, 900)

    def get_output_embeddings(self):
        return self.head


def test_auto_on_a_cpu_is_bf16_where_the_cpu_has_it_and_the_probe_measured_it_faster(monkeypatch):
    """'auto' on a CPU: bf16 only with the instructions, for a model whose layers (its LM head left out) hold at least
    MIN_PARAMETERS, and a probe at its largest layer at least MIN_SPEEDUP faster; without a model to probe, float32.
    The line for the log says which, and why."""
    probed = []

    def speedup(out_features, in_features):
        probed.append((out_features, in_features))
        return measured

    monkeypatch.setattr(precision, "bf16_speedup", speedup)
    model = _Body()
    for flags, measured, floor, expected in [
        (True, precision.MIN_SPEEDUP + 0.1, 38_400, torch.bfloat16),
        (True, precision.MIN_SPEEDUP - 0.1, 38_400, None),
        (True, 5.0, 38_401, None),  # too small to pay, whatever the probe would say
        (False, 5.0, 38_400, None),
    ]:
        monkeypatch.setattr(precision, "cpu_multiplies_bf16", lambda flags=flags: flags)
        monkeypatch.setattr(precision, "MIN_PARAMETERS", floor)
        probed.clear()
        assert precision.autocast_dtype("auto", CPU, model) is expected
        assert probed == ([(300, 64)] if flags and floor <= 38_400 else [])  # the largest layer but the LM head
        assert precision.autocast_dtype("auto", CPU) is None
        assert precision.autocast_dtype("float32", CPU, model) is None
        line = precision.describe("auto", expected, CPU, model)
        assert ("bf16" if expected else "float32") in line.split("(")[0], line
        if flags and floor <= 38_400:
            assert "300x64" in line and f"{measured:.2f}x" in line, line
        elif flags:
            assert "0.0M parameters" in line, line


def test_the_demo_and_test_models_compute_in_float32_on_every_cpu(tiny_models, monkeypatch):
    """They are far under MIN_PARAMETERS: no timing decides their precision, on a BF16 CPU or not."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(precision, "cpu_multiplies_bf16", lambda: True)
    monkeypatch.setattr(precision, "bf16_speedup", lambda *shape: 100.0)
    lm = AutoModelForCausalLM.from_pretrained(tiny_models["llama"][0])
    assert precision.autocast_dtype("auto", CPU, lm) is None


def test_the_probe_measures_a_speedup():
    speedup = precision.bf16_speedup.__wrapped__(64, 32, rows=16)
    assert 0.01 < speedup < 100


@pytest.mark.parametrize(
    "setting, device, recorded, kept",
    [
        ("auto", "cpu", "bf16", torch.bfloat16),
        ("auto", "cpu", "float32", None),
        ("auto", "cpu", None, False),  # a checkpoint from before the choice was recorded: resolved again
        ("float32", "cpu", "bf16", False),  # asked for: honoured
        ("bf16", "cpu", "float32", False),
        ("auto", "cuda", "float32", False),  # auto is bf16 on CUDA, no timing to keep
    ],
)
def test_a_resume_keeps_what_auto_chose_on_a_cpu_only(setting, device, recorded, kept):
    assert precision.kept_on_resume(setting, torch.device(device), recorded) is kept
    assert precision.computed_in(None) == "float32" and precision.computed_in(torch.bfloat16) == "bf16"
