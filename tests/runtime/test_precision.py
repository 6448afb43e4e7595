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
def test_the_vllm_engine_computes_in_the_trainers_dtype(monkeypatch, choice, expected):
    from fastppo.engines import vllm as vllm_engine
    from fastppo.ppo.config import PPOConfig

    seen = {}
    monkeypatch.setattr(vllm_engine, "VLLMEngine", lambda *args, **kwargs: seen.update(kwargs))
    vllm_engine.build_engine("/some/policy", PPOConfig(precision=choice), CPU)
    assert seen["dtype"] is expected
