"""Experiment tracking: MLflow to a local SQLite store by default, or nothing.

`sqlite:///<out>/mlflow.db` needs no server and no network (recent MLflow refuses a plain file
store); artifacts go to `<out>/mlartifacts`. `--tracking-uri` points at a server instead.
MLflow's usage telemetry is turned off unless the environment turns it on.

What goes wrong is one line, before MLflow's retries: a server that refuses the connection
(`server_unreachable`: MLflow would retry for minutes), a store MLflow cannot open. A default
store left half-built by a kill (MLflow builds it in a few seconds of migrations) is moved aside
to `mlflow.db.broken-<time>` and started afresh; a user's `--tracking-uri` is never touched.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import time
import urllib.parse
import urllib.request
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


def server_unreachable(url: str, timeout_s: float = 3.0) -> str | None:
    """Why a TCP connection to the server of `url` (http/https), or to the proxy the
    environment names for it, fails within `timeout_s`; None when it connects."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and host and not urllib.request.proxy_bypass(host):  # as requests and httpx do
        via = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = via.hostname, via.port or 80
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        return f"cannot connect to {host}:{port} within {timeout_s:g} s ({reason})"
    return None


def _store_verdict(db: Path) -> str | None:
    """Why the default store `db` is to be moved aside (None: keep it): it is no SQLite
    database, or it holds no run and is not at MLflow's schema (a first run killed while
    MLflow built it). A store holding runs is kept whatever MLflow thinks of it."""
    if not db.is_file() or db.stat().st_size == 0:  # none yet, or empty: MLflow builds it
        return None
    con = sqlite3.connect(db, timeout=5)
    try:  # a hot journal of a killed transaction is rolled back here, as MLflow would
        tables = {name for (name,) in con.execute("SELECT name FROM sqlite_master")}
        version = None
        if "alembic_version" in tables:
            version = con.execute("SELECT version_num FROM alembic_version").fetchone()
        runs = con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] if "runs" in tables else 0
    except sqlite3.OperationalError:  # locked, or a table of an odd shape: MLflow will say
        return None
    except sqlite3.DatabaseError as err:  # not a database, or a malformed one
        return f"not an SQLite database ({err})"
    finally:
        con.close()
    head = _schema_head()
    if runs or (version is not None and head is not None and version[0] == head):
        return None
    found = "no schema version" if version is None else f"schema version {version[0]}"
    return f"half-built (no run, {found}{f', not {head}' if head else ''})"


def _schema_head() -> str | None:
    """The schema revision this MLflow writes (None where it cannot be read)."""
    try:
        from mlflow.store.db.utils import _get_latest_schema_revision

        return _get_latest_schema_revision()
    except Exception:  # a private helper of MLflow's; without it any run-less store is moved
        return None


def _move_aside(db: Path, reason: str) -> None:
    """`db` (and SQLite's journal files beside it) -> `<db>.broken-<time>`; nothing deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = db.with_name(f"{db.name}.broken-{stamp}")
    n = 1
    while aside.exists():  # never over an earlier one
        aside, n = db.with_name(f"{db.name}.broken-{stamp}-{n}"), n + 1
    for suffix in ("-journal", "-wal", "-shm"):  # a journal beside a new store would corrupt it
        side = db.with_name(db.name + suffix)
        if side.exists():
            side.rename(aside.with_name(aside.name + suffix))
    db.rename(aside)
    log.warning("MLflow store %s: %s; moved aside to %s, starting a new store", db, reason, aside)


def _forget_store(uri: str) -> None:
    """Drop MLflow's cached store and engine of `uri`, which would keep using the file moved
    aside where this process opened it before (private parts of MLflow: skipped if gone)."""
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry
    except ImportError:
        return
    engine = getattr(SqlAlchemyStore, "_engine_map", {}).pop(uri, None)
    if engine is not None:
        engine.dispose()
    cached = getattr(_tracking_store_registry, "_get_store_with_resolved_uri", None)
    if hasattr(cached, "cache_clear"):
        cached.cache_clear()


def check_server(tracking_uri: str) -> None:
    """An http(s) server that refuses the connection: one line now (MLflow would retry for
    about 4 minutes; its retries stay as they are for the run, which outlasts a blip)."""
    if urllib.parse.urlsplit(tracking_uri).scheme not in ("http", "https"):
        return
    problem = server_unreachable(tracking_uri)
    if problem:
        raise ValueError(
            f"--tracking-uri {tracking_uri}: {problem}; start the MLflow server, correct the "
            "URI, or pass --no-track"
        )


def _start_run(mlflow, experiment: str, artifacts: str | None, run_id: str | None):
    """The experiment (created with `artifacts` where new) and the run, resumed by id."""
    from mlflow.exceptions import MlflowException

    if mlflow.get_experiment_by_name(experiment) is None:
        mlflow.create_experiment(experiment, artifact_location=artifacts)
    mlflow.set_experiment(experiment)
    if run_id is not None:
        try:
            mlflow.MlflowClient().get_run(run_id)
        except MlflowException:  # a store moved aside or deleted since the checkpoint
            log.warning("MLflow run %s is not in the store: tracking this run as a new one", run_id)
            run_id = None
    return mlflow.start_run(run_id=run_id)


class MLflowTracker:
    """One MLflow run; resumed by id when a checkpoint carries one (a new run where the store
    no longer holds it)."""

    def __init__(
        self, out: Path, experiment: str, tracking_uri: str | None, run_id: str | None
    ) -> None:
        mlflow = require("mlflow", "train", "MLflow tracking (off with --no-track)")
        self._mlflow = mlflow
        out = out.resolve()
        db = out / "mlflow.db"
        uri = tracking_uri or f"sqlite:///{db}"
        if tracking_uri:
            check_server(tracking_uri)
            where, remedy = f"--tracking-uri {tracking_uri}", "correct it"
        else:
            if reason := _store_verdict(db):
                _move_aside(db, reason)
                _forget_store(uri)
            where, remedy = f"MLflow store {db}", "move it aside"
        artifacts = None if tracking_uri else (out / "mlartifacts").as_uri()
        mlflow.set_tracking_uri(uri)
        try:
            self._run = _start_run(mlflow, experiment, artifacts, run_id)
        except Exception as err:  # no common base: MLflow's, SQLAlchemy's, requests' errors
            first = (str(err).strip().splitlines() or [""])[0]
            raise ValueError(
                f"{where}: MLflow cannot use it ({type(err).__name__}: {first}); {remedy}, "
                "or pass --no-track"
            ) from err
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
