"""MetricsLogger: closing is idempotent, a `with` block closes it, and a record after close appends."""

from __future__ import annotations

import json

from fastppo.runtime.metrics import MetricsLogger


def test_close_is_idempotent_and_a_later_record_appends(tmp_path):
    with MetricsLogger(str(tmp_path), tensorboard=True) as logger:
        logger.log({"step": 1, "policy/loss": 0.5})
    assert logger.file is None and logger.writer is None
    logger.close()  # a second close: nothing left to close, no error
    logger.log({"step": 2, "policy/loss": 0.25})
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert list((tmp_path / "tb").iterdir())  # TensorBoard's event files were written
