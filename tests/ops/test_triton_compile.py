"""Every Triton kernel compiles for the GPUs fastppo targets, sm_80 (A100) and sm_90 (H100/H200), on a machine
without one, and none spills registers with fp32/bf16/fp16 inputs.

The op tests run the kernels in Triton's interpreter, which accepts code a real compile rejects and never runs out of
registers. `tests/ops/triton_aot.py` compiles each kernel as its launcher launches it, through Triton's compiler and
bundled ptxas (PTX only, and no register check, when there is no ptxas). It needs a process where TRITON_INTERPRET
is unset before the kernels are imported, which conftest sets here: one subprocess per architecture, the two in
parallel. About a minute on 2 cores from a cold Triton cache, seconds from a warm one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARCHS = (80, 90)
# float64 is for the tests' exactness, not for speed: its register use is reported, its spills tolerated.
SPILLS_ALLOWED = {"fp64"}
# Spills another Triton's ptxas makes (bytes, by arch, kernel and case), run by .ci/triton36_tests.sh: Triton 3.6.0
# (the lent GPU machine's, docs/gpu.md) and its ptxas 12.8 keep these two launches at 48 and 32 registers by spilling
# one 8-byte value; Triton 3.9's ptxas 12.9 gives the second 34 registers and spills neither. One 8-byte spill is an
# L1 store and load per thread; any other spill, or a larger one, fails.
KNOWN_SPILLS = {
    "3.6": {
        ("sm_80", "_ppo_value_kernel", "ppo_value_loss (64, 1024) clip=0.2 grad=True fp16"): 8,
        ("sm_90", "_shape_rewards_kernel", "shape_rewards (512, 16) estimator=k2 fp32"): 8,
    }
}
# Launches that do not yet pass enable_fp_fusion (kernels/launch.py: FP_FUSION): none.
FP_FUSION_PENDING: set[str] = set()


@pytest.fixture(scope="module")
def compiled() -> dict[int, dict]:
    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton without its NVIDIA backend")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    processes = {
        arch: subprocess.Popen(
            [sys.executable, "-m", "tests.ops.triton_aot", "--arch", str(arch), "--json"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for arch in ARCHS
    }
    results = {}
    for arch, process in processes.items():
        stdout, stderr = process.communicate(timeout=900)
        if process.returncode != 0:
            pytest.fail(f"sm_{arch}: tests/ops/triton_aot.py failed before compiling:\n{stderr[-4000:]}")
        results[arch] = json.loads(stdout)
    return results


def describe(rows: list[dict]) -> str:
    from tests.ops.triton_aot import format_table

    return format_table(rows)


def known_spill(row: dict) -> int:
    import triton

    version = ".".join(triton.__version__.split(".")[:2])
    return KNOWN_SPILLS.get(version, {}).get((row["arch"], row["kernel"], row["config"].split(" [")[0]), 0)


@pytest.mark.parametrize("arch", ARCHS, ids=[f"sm_{arch}" for arch in ARCHS])
def test_every_kernel_compiles_without_spills(compiled, arch):
    rows = compiled[arch]["rows"]
    print(f"\n{describe(rows)}")
    missing = set(compiled[arch]["kernels"]) - {row["kernel"] for row in rows}
    assert not missing, f"no case in tests/ops/triton_aot.py launches {sorted(missing)}"
    failures = [f"{row['kernel']} {row['config']}:\n    {row['error']}" for row in rows if "error" in row]
    failures += [
        f"{row['kernel']} {row['config']}: {row['regs']} registers and {row['spill_bytes']} bytes of spills"
        for row in rows
        if row.get("spill_bytes") and row["dtype"] not in SPILLS_ALLOWED and row["spill_bytes"] > known_spill(row)
    ]
    assert not failures, f"sm_{arch}: " + "\n".join(failures)


def test_every_launch_states_fp_fusion(compiled):
    """Triton 3.10 flips the default of enable_fp_fusion: every launch says what it wants (launch.FP_FUSION)."""
    unstated = sorted(
        {row["kernel"] for row in compiled[ARCHS[0]]["rows"] if not row["explicit_fp_fusion"]} - FP_FUSION_PENDING
    )
    assert not unstated, f"launches without enable_fp_fusion=FP_FUSION: {unstated}"
