"""report_to: each backend through its own library, tested offline (wandb's offline mode, trackio's local store,
mlflow's file store); metrics.jsonl always; a backend asked for and not installed is refused naming the extra; the
deprecated `tensorboard` switch is mapped onto report_to with a warning."""

import glob
import json
import os
import subprocess
import sys
import textwrap

import pytest

from fastppo.ppo.config import PPOConfig
from fastppo.runtime.errors import InputError
from fastppo.runtime.metrics import MetricsLogger
from fastppo.runtime.reporting import check_report_to

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Two steps and a completions table, logged in a fresh process: each library keeps global state (wandb's service,
# trackio's store directory read at import, mlflow's active run).
SCRIPT = textwrap.dedent(
    """
    import sys
    from fastppo.runtime.metrics import MetricsLogger

    settings = {"learning_rate": 1e-05, "prompts": ["a prompt"] * 100}
    with MetricsLogger("run", [sys.argv[1]], run_name="my-run", settings=settings) as logger:
        logger.log({"step": 1, "reward/score_mean": 0.5})
        logger.log({"step": 2, "reward/score_mean": 0.75})
        logger.log_completions([{"prompt": "w1", "completion": "w7 | w8", "score": 1.0}], 2, "eval")
    """
)


def log_with(backend: str, directory, **env) -> None:
    pytest.importorskip(backend)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, backend],
        cwd=directory,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in open(directory / "run" / "metrics.jsonl")]
    assert [line["step"] for line in lines] == [1, 2]  # metrics.jsonl whatever the backends


def test_wandb_offline(tmp_path):
    log_with("wandb", tmp_path, WANDB_MODE="offline", WANDB_SILENT="true")
    (run,) = glob.glob(str(tmp_path / "run" / "wandb" / "offline-run-*" / "run-*.wandb"))
    data = open(run, "rb").read()  # wandb's own record format: the names and values are in it
    for expected in (b"my-run", b"reward/score_mean", b"0.75", b"learning_rate", b"completions/eval"):
        assert expected in data, expected


def test_trackio_local_store(tmp_path):
    store = {"TRACKIO_DIR": str(tmp_path / "trackio")}
    log_with("trackio", tmp_path, **store)
    read = (  # with trackio's own reader, in a process whose TRACKIO_DIR is the store (trackio reads it at import)
        "import json; from trackio.sqlite_storage import SQLiteStorage as S; "
        "print(json.dumps([S.get_logs('fastppo', 'my-run'), S.get_run_config('fastppo', 'my-run')]))"
    )
    out = subprocess.run([sys.executable, "-c", read], env={**os.environ, **store}, capture_output=True, text=True)
    logs, config = json.loads(out.stdout.strip().splitlines()[-1])
    assert [(log["step"], log.get("reward/score_mean")) for log in logs[:2]] == [(1, 0.5), (2, 0.75)]
    assert logs[2]["completions/eval"]["_value"][0]["completion"] == "w7 | w8"
    assert config["learning_rate"] == 1e-05 and config["prompts"] == "<list of 100>"


def test_mlflow_file_store(tmp_path):
    # mlflow 3 keeps its file store for those who opt in; sqlite:///... is its other local store
    log_with("mlflow", tmp_path, MLFLOW_TRACKING_URI=f"file:{tmp_path / 'mlruns'}", MLFLOW_ALLOW_FILE_STORE="true")
    (run,) = [p for p in glob.glob(str(tmp_path / "mlruns" / "*" / "*")) if os.path.isdir(os.path.join(p, "metrics"))]
    history = open(os.path.join(run, "metrics", "reward", "score_mean")).read().split("\n")
    assert [line.split()[1:] for line in history if line] == [["0.5", "1"], ["0.75", "2"]]  # value, step
    assert open(os.path.join(run, "params", "learning_rate")).read() == "1e-05"
    assert "my-run" in open(os.path.join(run, "tags", "mlflow.runName")).read()
    assert glob.glob(os.path.join(run, "artifacts", "completions", "eval-000002.json"))


def test_tensorboard_gets_scalars_and_the_completions_text(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(str(tmp_path), ["tensorboard"]) as logger:
        logger.log({"step": 1, "reward/score_mean": 0.5})
        logger.log_completions([{"prompt": "w1", "completion": "w7 | w8", "score": 1.0}], 1, "train")
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0}).Reload()
    assert [s.value for s in events.Scalars("reward/score_mean")] == [0.5]
    text = events.Tensors("completions/train/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| step | split | prompt | completion | score |" in text and "w7 \\| w8" in text


def test_report_to_none_writes_metrics_jsonl_only(tmp_path):
    with MetricsLogger(str(tmp_path), check_report_to("none")) as logger:
        logger.log({"step": 1, "reward/score_mean": 0.5})
    assert os.listdir(tmp_path) == ["metrics.jsonl"]


@pytest.mark.parametrize("backend", ["wandb", "trackio", "mlflow"])
def test_a_backend_that_is_not_installed_is_refused_naming_the_extra(monkeypatch, backend):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == backend else find_spec(name, *a))
    with pytest.raises(InputError, match=f'pip install "fastppo\\[{backend}\\]"'):
        PPOConfig(report_to=["tensorboard", backend]).validate()


@pytest.mark.parametrize("value", ["all", ["comet_ml"], ["tensorboard", 3]])
def test_unknown_backends_are_refused(value):
    with pytest.raises(InputError, match="report_to"):
        PPOConfig(report_to=value).validate()


@pytest.mark.parametrize(
    ("tensorboard", "report_to", "expected"),
    [(False, ["tensorboard"], []), (True, [], ["tensorboard"]), (True, "none", ["tensorboard"])],
)
def test_the_tensorboard_switch_is_mapped_onto_report_to_with_a_warning(tensorboard, report_to, expected):
    config = PPOConfig.from_dict({"tensorboard": tensorboard, "report_to": report_to})
    with pytest.warns(FutureWarning, match="report_to"):
        config.validate()
    assert config.report_to == expected
    config.validate()  # once: validating again neither warns nor changes it
    assert config.report_to == expected


def test_a_backend_that_fails_to_start_stops_the_run_naming_it(tmp_path, monkeypatch):
    from fastppo.runtime import reporting

    def broken(*args):
        raise RuntimeError("tracking server unreachable")

    monkeypatch.setitem(reporting.CLASSES, "tensorboard", broken)
    logger = MetricsLogger(str(tmp_path), ["tensorboard"])
    with pytest.raises(InputError, match="tensorboard did not start .*unreachable"):
        logger.log({"step": 1})
