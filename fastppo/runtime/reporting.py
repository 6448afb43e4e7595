"""Where a run's metrics go besides metrics.jsonl (always written): `report_to`, each through its own library.

    tensorboard  <output_dir>/tb, with torch.utils.tensorboard (a core dependency)
    wandb        wandb.init(project=$WANDB_PROJECT or "fastppo", name=run_name, dir=output_dir); WANDB_MODE=offline
                 keeps the run on disk (`wandb sync` uploads it later)
    trackio      trackio.init(project=$TRACKIO_PROJECT or "fastppo", name=run_name): its local store ($TRACKIO_DIR)
    mlflow       mlflow.start_run(run_name=run_name) in $MLFLOW_EXPERIMENT_NAME (or "fastppo") at $MLFLOW_TRACKING_URI
                 (mlflow's default when unset; a `file:` URI is a local file store)

Each backend gets the step's scalars, the run's settings once, and the completions tables (`log_completions`,
evaluation). wandb, trackio and mlflow are optional extras: asking for one that is not installed is refused before
anything loads (`check_report_to`), naming the extra to install. TRL's names and values (`report_to`, `run_name`).
"""

from __future__ import annotations

import importlib.util
import os

from fastppo.runtime.errors import InputError
from fastppo.runtime.validation import clip, short

BACKENDS = ("tensorboard", "wandb", "trackio", "mlflow")
OPTIONAL = ("wandb", "trackio", "mlflow")  # each a pip extra of the same name


def check_report_to(value) -> list[str]:
    """`report_to` as a list of backend names: a name or a list of them; 'none' (or an empty list) for none. A name
    fastppo does not know, or an optional backend that is not installed, is refused naming the fix."""
    names = [value] if isinstance(value, str) else list(value)
    if names == ["none"]:
        return []
    for name in names:
        if name == "all":
            raise InputError(
                f"report_to: 'all' would depend on what is installed; name the backends ({', '.join(BACKENDS)})"
            )
        if name not in BACKENDS:
            raise InputError(
                f"report_to: {short(name)} is not a backend fastppo reports to ({', '.join(BACKENDS)} or none)"
            )
        if name in OPTIONAL and importlib.util.find_spec(name) is None:
            raise InputError(f'report_to: {name} is not installed: pip install "fastppo[{name}]" (or remove it)')
    return list(dict.fromkeys(names))


def loggable_settings(settings: dict) -> dict:
    """A run's settings as the backends store them: scalars and short lists of scalars as they are, anything bigger
    (a list of prompts, a dataset, a model object) by a short description."""
    scalar = (str, int, float, bool, type(None))
    out = {}
    for name, value in settings.items():
        if isinstance(value, scalar):
            out[name] = value
        elif isinstance(value, (list, tuple)) and len(value) <= 16 and all(isinstance(v, scalar) for v in value):
            out[name] = list(value)
        else:
            out[name] = f"<{type(value).__name__}{f' of {len(value)}' if hasattr(value, '__len__') else ''}>"
    return out


def markdown_table(rows: list[dict]) -> str:
    """Completions as a markdown table (TensorBoard's text tab renders it)."""

    def cell(value) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", "<br>")

    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


class TensorBoard:
    def __init__(self, output_dir: str, run_name: str, settings: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(output_dir, "tb"))

    def log(self, scalars: dict, step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def completions(self, rows: list[dict], step: int, split: str) -> None:
        self.writer.add_text(f"completions/{split}", markdown_table(rows), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class RunLibrary:
    """wandb and trackio, which share one API: `init(...)` returns a run with `log(values, step=)` and `finish()`,
    and a `Table(columns=, data=)` logs as a value."""

    def __init__(self, library, run):
        self.library, self.run = library, run

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def completions(self, rows: list[dict], step: int, split: str) -> None:
        columns = list(rows[0])
        table = self.library.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])
        self.run.log({f"completions/{split}": table}, step=step)

    def close(self) -> None:
        self.run.finish()


def wandb_run(output_dir: str, run_name: str, settings: dict) -> RunLibrary:
    import wandb

    project = os.environ.get("WANDB_PROJECT", "fastppo")
    run = wandb.init(project=project, name=run_name, dir=output_dir, config=settings, reinit="create_new")
    return RunLibrary(wandb, run)


def trackio_run(output_dir: str, run_name: str, settings: dict) -> RunLibrary:
    import trackio

    project = os.environ.get("TRACKIO_PROJECT", "fastppo")
    return RunLibrary(trackio, trackio.init(project=project, name=run_name, config=settings, embed=False))


class MLflow:
    def __init__(self, output_dir: str, run_name: str, settings: dict):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "fastppo"))
        self.run = mlflow.start_run(run_name=run_name, nested=mlflow.active_run() is not None)
        # mlflow keeps parameters as strings of at most a few thousand characters
        mlflow.log_params({name: str(value)[:500] for name, value in settings.items()}, run_id=self.run.info.run_id)

    def log(self, scalars: dict, step: int) -> None:
        self.mlflow.log_metrics(scalars, step=step, run_id=self.run.info.run_id)

    def completions(self, rows: list[dict], step: int, split: str) -> None:
        columns = {c: [row[c] for row in rows] for c in rows[0]}
        self.mlflow.log_table(
            columns, artifact_file=f"completions/{split}-{step:06d}.json", run_id=self.run.info.run_id
        )

    def close(self) -> None:
        self.mlflow.end_run()


CLASSES = {"tensorboard": TensorBoard, "wandb": wandb_run, "trackio": trackio_run, "mlflow": MLflow}


def open_backends(names, output_dir: str, run_name: str | None, settings: dict | None) -> list:
    """The backends of `names` (checked by `check_report_to`), each started; the run is named `run_name`, or after
    its output directory. One that fails to start (a tracking URI its library refuses, a broken install) stops the
    run naming it: a run asked to report somewhere does not go on without saying so."""
    run_name = run_name or os.path.basename(os.path.abspath(output_dir))
    settings = loggable_settings(settings or {})
    backends = []
    for name in names:
        try:
            backends.append(CLASSES[name](output_dir, run_name, settings))
        except Exception as error:  # noqa: BLE001 - each library fails its own way
            for backend in backends:
                backend.close()
            raise InputError(
                f"report_to: {name} did not start ({type(error).__name__}: {clip(error)}); fix its settings or "
                "remove it from report_to (metrics.jsonl is written either way)"
            ) from None
    return backends
