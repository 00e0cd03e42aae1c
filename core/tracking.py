"""Everything that talks to MLflow: one ``Tracker`` per run, plus run lookups.

The default store is a local SQLite file (``sqlite:///mlflow.db``) with
artifacts in ``mlartifacts/`` beside it, so ``mlflow ui`` needs no server; a
PostgreSQL URI works the same for several machines. ``MLFLOW_TRACKING_URI``
overrides the default (never an explicit config value or flag). Names of params, tags, metrics and artifacts are
listed in docs/contracts.md.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus, RunTag

from core.config import Config, config_to_dict, flatten, save_config
from core.naming import axis_tags
from core.stores import artifact_root, resolve_uri

log = logging.getLogger(__name__)
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
DESCRIPTION_TAG = "mlflow.note.content"  # the run's description in the UI
_BATCH = 500


def get_client(uri: str | None) -> MlflowClient:
    """An MlflowClient on the resolved tracking URI."""
    return MlflowClient(tracking_uri=resolve_uri(uri))


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, creating it (artifacts beside a local store) if needed."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    root = artifact_root(client.tracking_uri)
    location = f"{root}/{name}" if root else None
    try:  # the UI opens a "model training" experiment on its runs table
        return client.create_experiment(name, artifact_location=location,
                                        tags={"mlflow.experimentKind": "custom_model_development"})
    except mlflow.exceptions.MlflowException:  # created by a concurrent worker
        return client.get_experiment_by_name(name).experiment_id


def git_commit() -> str:
    """The commit of the working tree the code runs from ("unknown" outside git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment_tags(device: torch.device | str | None = None) -> dict[str, str]:
    """Tags that say where a run ran: git commit, torch/CUDA versions, device name, host."""
    device = torch.device(device or "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "cuda_version": str(torch.version.cuda or "none"),
        "device": f"{device.type}: {name}",
        "host": platform.node(),
    }


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."


class Tracker:
    """One MLflow run: params, tags, metrics and artifacts, ended FINISHED or FAILED with a reason.

    ``enabled=False`` (non-zero DDP ranks) turns every call into a no-op, so the
    training loop never branches on rank to log. ``system_metrics_s`` (seconds) samples
    MLflow's system metrics (CPU, memory, disk, network; GPU utilisation and memory on
    CUDA, when pynvml is installed) into the run every that many seconds until it ends.
    """

    def __init__(self, uri: str | None, experiment: str, run_name: str | None = None, run_id: str | None = None,
                 parent_run_id: str | None = None, tags: dict[str, str] | None = None, enabled: bool = True,
                 system_metrics_s: float | None = None) -> None:
        self.enabled = enabled
        self.run_id: str | None = run_id
        self._monitor: Any = None
        if not enabled:
            return
        self.client = get_client(uri)
        if run_id is None:
            experiment_id = ensure_experiment(self.client, experiment)
            all_tags = {k: str(v) for k, v in (tags or {}).items()}  # a tracking server takes strings only
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            if run_name:
                all_tags["mlflow.runName"] = run_name
            self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
            self.set_tags(tags or {})
        if system_metrics_s:
            self._start_system_metrics(system_metrics_s, resume=run_id is not None)

    def _start_system_metrics(self, interval_s: float, resume: bool) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval_s, resume_logging=resume,
                                             tracking_uri=self.uri)
        self._monitor.start()

    def _stop_system_metrics(self) -> None:
        if self._monitor is not None:
            self._monitor.finish()  # logs what it sampled since the last write
            self._monitor = None

    @classmethod
    def attach(cls, uri: str | None, run_id: str) -> Tracker:
        """A tracker on an existing run that leaves its status as it is (a finished matrix's parent run)."""
        tracker = cls(uri, "", enabled=False)
        tracker.enabled, tracker.run_id, tracker.client = True, run_id, get_client(uri)
        return tracker

    @property
    def uri(self) -> str:
        """The tracking URI of this run's store."""
        return self.client.tracking_uri

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params (values stringified and cut to MLflow's limit); re-logging equal values is fine."""
        if not self.enabled or not params:
            return
        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, _param_value(v)) for k, v in params.items() if k not in existing]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log_config(self, cfg: Config) -> None:
        """Every resolved config value as a param, the resolved YAML as ``config.yaml``, and each ablation axis
        (``attention``, ``norm``, ``mlp``, ``loss``, ``encoder``, ``seed``) as a tag and param under its short key."""
        if not self.enabled:
            return
        params = flatten(config_to_dict(cfg))
        searchable = axis_tags(params)
        self.log_params({**params, **searchable})
        self.set_tags(searchable)
        with tempfile.TemporaryDirectory() as tmp:
            self.client.log_artifact(self.run_id, str(save_config(cfg, Path(tmp) / "config.yaml")))

    def log_datasets(self, splits: dict[str, Any], source: str | Path, name: str) -> None:
        """Each split the run reads as an MLflow dataset input (what ``mlflow.log_input`` logs; the UI's Dataset
        column).

        ``splits`` maps the context (``train``, ``valid``) to a dataset with ``split``,
        ``fingerprint`` (the content hash, logged as the digest) and ``len``; ``source``
        is the data root, ``name`` the data set's name.
        """
        if not self.enabled or not splits:
            return
        uri = json.dumps({"uri": str(Path(source).resolve())})
        inputs = []
        for context, dataset in splits.items():
            entity = Dataset(name=f"{name}/{dataset.split}", digest=str(dataset.fingerprint)[:36], source_type="local",
                             source=uri, profile=json.dumps({"split": dataset.split, "num_volumes": len(dataset)}))
            inputs.append(DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)]))
        self.client.log_inputs(self.run_id, datasets=inputs)

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set run tags (values stringified)."""
        if self.enabled and tags:
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log finite numeric metrics at ``step``; non-finite values are skipped with a debug line."""
        if not self.enabled or not metrics:
            return
        timestamp = int(pd.Timestamp.now().timestamp() * 1000)
        items = []
        for key, value in metrics.items():
            value = float(value)
            if math.isfinite(value):
                items.append(Metric(key, value, timestamp, int(step)))
            else:
                log.debug("metric %s=%s at step %d not logged (not finite)", key, value, step)
        for start in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, metrics=items[start:start + _BATCH])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a local file or folder into the run's artifacts."""
        if not self.enabled:
            return
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dataframe(self, frame: pd.DataFrame, name: str) -> None:
        """Store ``frame`` as the CSV artifact ``name``."""
        if not self.enabled:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            frame.to_csv(path, index=False)
            self.client.log_artifact(self.run_id, str(path))

    def log_text(self, text: str, name: str) -> None:
        """Store ``text`` as the artifact file ``name``."""
        if self.enabled:
            self.client.log_text(self.run_id, text, name)

    def finish(self) -> None:
        """Mark the run FINISHED."""
        if self.enabled:
            self._stop_system_metrics()
            self.client.set_terminated(self.run_id, status="FINISHED")

    def fail(self, reason: str) -> None:
        """Mark the run FAILED and record why (tag ``failure_reason``, the run's description in the UI, and a
        ``failure.txt`` artifact)."""
        if not self.enabled:
            return
        self._stop_system_metrics()
        self.set_tags({"failure_reason": reason[:5000], DESCRIPTION_TAG: f"**Failed**: {reason[:5000]}"})
        self.log_text(reason, "failure.txt")
        self.client.set_terminated(self.run_id, status="FAILED")

    def kill(self) -> None:
        """Mark the run KILLED (interrupted by the user); it can be resumed."""
        if self.enabled:
            self._stop_system_metrics()
            self.client.set_terminated(self.run_id, status="KILLED")


def run_status(uri: str | None, run_id: str) -> str:
    """The status (RUNNING, FINISHED, FAILED, KILLED) of a run."""
    return get_client(uri).get_run(run_id).info.status


def find_runs(uri: str | None, filter_string: str, experiment: str | None = None,
              statuses: tuple[str, ...] = ()) -> list[Any]:
    """Runs matching an MLflow filter, in all experiments unless ``experiment`` is named."""
    client = get_client(uri)
    if experiment is not None:
        exp = client.get_experiment_by_name(experiment)
        ids = [exp.experiment_id] if exp else []
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    if not ids:
        return []
    runs = client.search_runs(ids, filter_string=filter_string, max_results=50000)
    return [r for r in runs if not statuses or r.info.status in statuses]


FINISHED = RunStatus.to_string(RunStatus.FINISHED)


def log_efficiency_runs(rows: list[dict[str, dict[str, Any]]], uri: str | None = None,
                        experiment: str = "efficiency") -> list[str]:
    """One FINISHED run per bench record (``core.bench.model.bench_to_mlflow_rows``) in the ``efficiency``
    experiment."""
    run_ids = []
    for row in rows:
        device = str(row["params"].get("bench.device", "cpu"))
        tracker = Tracker(uri, experiment, run_name=row["tags"].get("cell_label"),
                          tags={**row["tags"], **environment_tags(device)})
        tracker.log_params(row["params"])
        tracker.log_metrics(row["metrics"], step=0)
        tracker.finish()
        run_ids.append(tracker.run_id)
    return run_ids


def log_report(uri: str | None, run_id: str, out: Path, files: list[Path], metrics: dict[str, float],
               tags: dict[str, str]) -> None:
    """A matrix's report on its parent run: each file under its path relative to ``out`` (report.md at the top,
    tables/, figures/), the headline metrics and which configurations they belong to."""
    tracker = Tracker.attach(uri, run_id)
    for path in files:
        folder = Path(path).resolve().parent.relative_to(Path(out).resolve()).as_posix()
        tracker.log_artifact(path, None if folder == "." else folder)
    tracker.log_metrics(metrics, step=0)
    tracker.set_tags(tags)
