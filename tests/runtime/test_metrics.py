"""MetricsLogger: closing is idempotent, a `with` block closes it, and a record after close appends."""

from __future__ import annotations

import json

from fastppo.runtime.metrics import MetricsLogger


def test_close_is_idempotent_and_a_later_record_appends(tmp_path):
    with MetricsLogger(str(tmp_path), report_to=["tensorboard"]) as logger:
        logger.log({"step": 1, "policy/loss": 0.5})
    assert not logger.files and logger.backends is None
    logger.close()  # a second close: nothing left to close, no error
    logger.log({"step": 2, "policy/loss": 0.25})
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert list((tmp_path / "tb").iterdir())  # TensorBoard's event files were written


def test_a_fresh_run_replaces_the_previous_runs_files_at_its_first_record(tmp_path):
    for name in ("metrics.jsonl", "completions.jsonl"):
        (tmp_path / name).write_text('{"step": 7}\n')  # a previous run's, left by overwrite_output_dir
    logger = MetricsLogger(str(tmp_path), report_to=[])
    assert (tmp_path / "completions.jsonl").exists()  # nothing touched before the first record
    logger.log({"step": 1})
    logger.close()
    assert not (tmp_path / "completions.jsonl").exists()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]
