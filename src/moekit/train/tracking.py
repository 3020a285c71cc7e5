"""Experiment tracking: MLflow to a local SQLite store by default, or nothing.

`sqlite:///<out>/mlflow.db` needs no server and no network (recent MLflow refuses a plain file
store); artifacts go to `<out>/mlartifacts`. `--tracking-uri` points at a server instead.
MLflow's usage telemetry is turned off unless the environment turns it on.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from .._extras import require

log = logging.getLogger(__name__)

_BATCH = 1000  # metrics per MLflow log_batch call (its limit)

# MLflow >= 3.2 reports usage over the network unless told not to; moekit makes no network
# connection by default (set MLFLOW_DISABLE_TELEMETRY=false to allow it).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


class NullTracker:
    """Tracking turned off (`--no-track`)."""

    run_id: str | None = None

    def log_params(self, params: dict) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


class MLflowTracker:
    """One MLflow run; resumed by id when a checkpoint carries one."""

    def __init__(
        self, out: Path, experiment: str, tracking_uri: str | None, run_id: str | None
    ) -> None:
        mlflow = require("mlflow", "train", "MLflow tracking (off with --no-track)")
        self._mlflow = mlflow
        out = out.resolve()
        uri = tracking_uri or f"sqlite:///{out / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        if mlflow.get_experiment_by_name(experiment) is None:
            artifacts = None if tracking_uri else (out / "mlartifacts").as_uri()
            mlflow.create_experiment(experiment, artifact_location=artifacts)
        mlflow.set_experiment(experiment)
        self._run = mlflow.start_run(run_id=run_id)
        self.run_id = self._run.info.run_id
        self._pending: list = []  # metrics not yet sent
        log.info("MLflow run %s at %s", self.run_id, uri)

    def log_params(self, params: dict) -> None:
        self._mlflow.log_params({k: str(v) for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Buffered: sent in batches by `flush` (the trainer logs every step; one SQLite
        transaction a step would cost more than the step's bookkeeping)."""
        from mlflow.entities import Metric  # imported by __init__

        stamp = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), stamp, step) for k, v in metrics.items()]
        if len(self._pending) >= _BATCH:
            self.flush()

    def flush(self) -> None:
        """Send the buffered metrics (MLflow takes at most 1000 a batch)."""
        client = self._mlflow.MlflowClient()
        while self._pending:
            batch, self._pending = self._pending[:_BATCH], self._pending[_BATCH:]
            client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: Path) -> None:
        self._mlflow.log_artifact(str(path))

    def close(self, status: str = "FINISHED") -> None:
        self.flush()
        self._mlflow.end_run(status=status)


def make_tracker(
    track: bool, out: Path, experiment: str, tracking_uri: str | None, run_id: str | None
) -> MLflowTracker | NullTracker:
    return MLflowTracker(out, experiment, tracking_uri, run_id) if track else NullTracker()
