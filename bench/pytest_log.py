"""A pytest plugin (`-p bench.pytest_log`) for bench/gpu_proof.py: it runs one shard of the selected tests and appends
one JSON line per test outcome to $FASTPPO_TEST_LOG the moment it is known, so that the proof can say which tests
passed, failed or never ran even when it stops a shard at its time limit (a junit file is written only at the end).

  FASTPPO_TEST_SHARD=i/k      keep the i-th of k runs of consecutive selected tests (a module's tests stay together,
                              so its kernels compile in one process)
  FASTPPO_TEST_SAMPLE=1       first keep one test of each module, a Triton one where it has some (the dry
                              run's selection)

Lines: {"collected" (what `-m gpu` selected), "selected" (this shard's tests), "shard"} once the shard is chosen;
then per test {"nodeid", "outcome": passed | failed | skipped | error, "when": collect | setup | call | teardown,
"seconds"}, with "message" (the end of the failure's report, or the skip's reason) for all but a pass.
"""

from __future__ import annotations

import json
import os

import pytest


def write(line: dict) -> None:
    with open(os.environ["FASTPPO_TEST_LOG"], "a") as f:
        f.write(json.dumps(line) + "\n")


def one_of_each_module(items: list) -> list:
    """The first test of each module, or its first with the Triton backend (the kernels are what a GPU adds)."""
    chosen: dict[str, object] = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        if module not in chosen or ("triton" in item.nodeid and "triton" not in chosen[module].nodeid):
            chosen[module] = item
    return [item for item in items if item in chosen.values()]


@pytest.hookimpl(trylast=True)  # after `-m gpu` has deselected the rest
def pytest_collection_modifyitems(config, items) -> None:
    if not os.environ.get("FASTPPO_TEST_LOG"):
        return
    index, count = (int(n) for n in os.environ.get("FASTPPO_TEST_SHARD", "0/1").split("/"))
    sample = one_of_each_module(items) if os.environ.get("FASTPPO_TEST_SAMPLE") == "1" else list(items)
    size = -(-len(sample) // count)
    keep = sample[index * size : (index + 1) * size]
    kept = set(map(id, keep))
    write({"collected": len(items), "selected": len(keep), "shard": f"{index}/{count}"})
    config.hook.pytest_deselected(items=[item for item in items if id(item) not in kept])
    items[:] = keep


def pytest_collectreport(report) -> None:
    """A module that cannot be imported is one error line (from the first shard only: every shard collects it)."""
    first = os.environ.get("FASTPPO_TEST_SHARD", "0/1").startswith("0/")
    if os.environ.get("FASTPPO_TEST_LOG") and report.failed and first:
        write({"nodeid": report.nodeid, "outcome": "error", "when": "collect", "message": report.longreprtext[-1500:]})


def pytest_runtest_logreport(report) -> None:
    if not os.environ.get("FASTPPO_TEST_LOG") or (report.passed and report.when != "call"):
        return  # a setup or teardown that passed: the call's line says it all
    outcome = report.outcome if report.when == "call" or report.skipped else "error"
    line = {"nodeid": report.nodeid, "outcome": outcome, "when": report.when, "seconds": round(report.duration, 3)}
    if not report.passed:
        reason = report.longrepr[2] if report.skipped and isinstance(report.longrepr, tuple) else report.longreprtext
        line["message"] = str(reason)[-1500:]
    write(line)
