"""MLflow conventions: one embedded store per working directory, named runs, our metric names.

Metrics go into the run that MONAI's `MLFlowHandler` opened (the one `monai.bundle run --tracking mlflow`
attaches), so one training job is one MLflow run whatever logs into it. mlflow is imported lazily.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Mapping

from voco.errors import optional_import


def default_tracking_uri(root: str | os.PathLike | None = None) -> str:
    """`$MLFLOW_TRACKING_URI`, else the embedded store ``sqlite:///<abs root>/runs/mlflow.db`` (root: the cwd)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    folder = Path(root or os.getcwd()).resolve() / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def default_run_name(*parts: Any) -> str:
    """A readable, unique run name such as ``voco-swin-B-20261122-101500``; unnamed runs get merged by MONAI."""
    words = [re.sub(r"[^A-Za-z0-9_.-]+", "-", str(part)) for part in parts if part not in (None, "")]
    return "-".join(words + [time.strftime("%Y%m%d-%H%M%S")])


def prepare_experiment(tracking_uri: str, experiment_name: str, artifact_root: str | os.PathLike | None = None) -> str:
    """Create the experiment (artifacts beside the store, not in ./mlruns) unless it exists; return its id."""
    mlflow = optional_import("mlflow", "MLflow tracking")
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is not None:
        return experiment.experiment_id
    if artifact_root is None and tracking_uri.startswith("sqlite:///"):
        artifact_root = Path(tracking_uri[len("sqlite:///"):]).parent / "artifacts"
    location = Path(artifact_root).resolve().as_uri() if artifact_root is not None else None
    return client.create_experiment(experiment_name, artifact_location=location)


def attached_mlflow_handlers(engine: Any) -> list:
    """Every MONAI `MLFlowHandler` attached to an ignite engine."""
    try:
        from monai.handlers import MLFlowHandler
    except ImportError:  # monai without mlflow support
        return []
    found = []
    for handlers in getattr(engine, "_event_handlers", {}).values():
        for handler, *_ in handlers:
            owner = getattr(handler, "__self__", None)
            if isinstance(owner, MLFlowHandler) and all(owner is not known for known in found):
                found.append(owner)
    return found


def attached_mlflow_handler(engine: Any):
    """The MONAI `MLFlowHandler` that tracks an ignite engine: the one `--tracking mlflow` attached, else the
    bundle's default (`voco.engine.handlers.DefaultMLFlowHandler`, which `stands_back`); None without either."""
    found = attached_mlflow_handlers(engine)
    chosen = [handler for handler in found if not getattr(handler, "stands_back", False)] or found
    return chosen[0] if chosen else None


class RunLogger:
    """Log metrics and artifacts into the MLflow run of the engine's `MLFlowHandler`; a no-op without one."""

    def __init__(self, engine: Any) -> None:
        self.handler = attached_mlflow_handler(engine)

    @property
    def active(self) -> bool:
        return self.handler is not None and self.handler.cur_run is not None

    @property
    def run_id(self) -> str | None:
        return self.handler.cur_run.info.run_id if self.active else None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self.active:
            self.handler._log_metrics(dict(metrics), step=step)  # MONAI's batching, retries and name checks

    def log_artifact(self, path: str | os.PathLike, folder: str | None = None) -> None:
        if self.active:
            self.handler.client.log_artifact(self.run_id, str(path), folder)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.active:
            for key, value in tags.items():
                self.handler.client.set_tag(self.run_id, key, str(value))

    def end(self, status: str) -> None:
        """Close the run with this MLflow status ("KILLED", "FAILED") through MONAI's handler. MONAI's handler
        continues a run of the same name that is not FINISHED, so the resumed job logs into this run again."""
        if self.active:
            self.handler.run_finish_status = status
            self.handler.close()

    def mark_running(self) -> None:
        """Set a run that a stopped job closed (KILLED, FAILED) and a resumed job continues back to RUNNING."""
        if self.active and self.handler.cur_run.info.status != "RUNNING":
            self.handler.client.update_run(self.run_id, status="RUNNING")

    def continue_finished_run(self) -> None:
        """Go on in the FINISHED run of this name, for a resumed job that trains further (a higher --max_steps).

        MONAI's handler continues only runs that are not FINISHED, so it opened a new, empty run of the same name;
        that one is deleted and the finished run reopened, so one training job stays one MLflow run."""
        if not self.active or not self.handler.run_name:
            return
        client, opened = self.handler.client, self.handler.cur_run
        finished = [run for run in client.search_runs([opened.info.experiment_id], order_by=["start_time DESC"])
                    if run.info.run_name == self.handler.run_name and run.info.status == "FINISHED"
                    and run.info.run_id != opened.info.run_id]
        if not finished:
            return
        client.delete_run(opened.info.run_id)
        self.handler.cur_run = client.get_run(finished[0].info.run_id)
        client.update_run(finished[0].info.run_id, status="RUNNING")


def read_run_metrics(tracking_uri: str, experiment_name: str, run_name: str | None = None) -> list[dict]:
    """Runs of an experiment as dicts {run_id, run_name, status, metrics (latest values), params, tags}."""
    mlflow = optional_import("mlflow", "reading MLflow runs")
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id])
    return [{"run_id": run.info.run_id, "run_name": run.info.run_name, "status": run.info.status,
             "metrics": dict(run.data.metrics), "params": dict(run.data.params), "tags": dict(run.data.tags)}
            for run in runs if run_name is None or run.info.run_name == run_name]
