"""`fastppo compare --quick` end to end: every method's row, the Markdown table, the plot and the JSON."""

from __future__ import annotations

import json
import math
import os

import pytest

from fastppo.cli import main
from fastppo.demo import compare


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    output_dir = str(tmp_path_factory.mktemp("compare") / "run")
    assert main(["compare", "--quick", "--best-of", "4", "--output-dir", output_dir]) == 0
    with open(os.path.join(output_dir, "compare.json")) as f:
        return output_dir, json.load(f)


EXPECTED_ROWS = ["SFT policy", *[name for name, _, _ in compare.ONLINE], "DPO", "best-of-4 (SFT + reward model)"]


@pytest.mark.slow
def test_every_method_has_a_finite_row(quick_run):
    _, summary = quick_run
    assert [r["method"] for r in summary["rows"]] == EXPECTED_ROWS
    for row in summary["rows"]:
        for key in ("gold", "proxy", "kl", "length", "seconds", "peak_mb"):
            assert math.isfinite(row[key]), (row["method"], key, row[key])
    best_of = summary["rows"][-1]
    assert best_of["kl"] == pytest.approx(math.log(4) - 3 / 4)


@pytest.mark.slow
def test_table_and_plot_are_written(quick_run):
    output_dir, summary = quick_run
    with open(os.path.join(output_dir, "compare.md")) as f:
        text = f.read()
    for name in EXPECTED_ROWS:
        assert f"| {name} |" in text
    with open(os.path.join(output_dir, "compare.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert set(summary["curves"]) == {name for name, _, _ in compare.ONLINE}


def test_bad_best_of_is_an_input_error(tmp_path, capsys):
    assert main(["compare", "--quick", "--best-of", "0", "--output-dir", str(tmp_path / "run")]) == 2
    assert "--best-of" in capsys.readouterr().err


def test_run_names_are_directory_names():
    assert compare.run_name("PPO, no KL control") == "ppo-no-kl-control"
    assert compare.run_name("REINFORCE++") == "reinforce++"
