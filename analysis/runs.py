"""A matrix's runs from MLflow as pandas: the one loader every table uses, plus artifacts and metric histories.

``load_runs`` returns ``mlflow.search_runs``'s frame (``run_id``, ``status``,
``metrics.*``, ``params.*``, ``tags.*`` ...) cut to FINISHED runs, the newest
per cell, with columns every table relies on added:

- ``cell_id``: the ``cell_id`` tag (the run id where a run has none),
- ``config``: the row label ("SA+GELU+LN, softmax"; the ``cell_label`` tag when set), shared by the seeds of
  one configuration (a matrix's ``repeats``): runs whose result-changing params differ only in ``train.seed``
  are replicates of one configuration; different configurations with the same label get their
  ``config_key``'s first 8 characters appended,
- ``config_key``: a hash of the run's result-changing params without the seed (one per configuration),
- ``seed``: the run's ``train.seed`` param (None when not logged),
- ``component.<axis>``: the resolved value of each axis in ``core.naming.AXES``,
- ``protocol``: the first of the run's ``eval.protocols`` (the one its unsuffixed metrics use).

Rows come in baseline-first component order. Nothing here writes to the store.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from core.config import NON_SEMANTIC_KEYS
from core.naming import AXES, SEARCH_AXES, component_rank, component_values, config_label
from core.registry import ConfigError, closest

log = logging.getLogger(__name__)

PER_LABEL_ARTIFACT = "zeroshot_per_label.csv"
PREDICTIONS_ARTIFACT = "zeroshot_predictions.csv"
_CONFIG_PREFIX = "config."  # efficiency runs log their config as params config.*


class NoRunsError(ConfigError):
    """No finished run matches the matrix name in the tracking store."""


@contextlib.contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """Point mlflow's fluent API at ``uri`` for a block, then restore the previous URI."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def _quoted(value: str, what: str) -> str:
    if "'" in value:
        raise ConfigError(f"{what} {value!r} contains a single quote, which MLflow filters cannot match; rename it")
    return f"'{value}'"


def _search(tracking_uri: str, filter_string: str, experiment_names: list[str] | None) -> pd.DataFrame:
    with _tracking_uri(tracking_uri):
        if experiment_names is None:
            return mlflow.search_runs(search_all_experiments=True, filter_string=filter_string)
        client = MlflowClient(tracking_uri)
        present = [name for name in experiment_names if client.get_experiment_by_name(name) is not None]
        if not present:
            return pd.DataFrame(columns=["run_id", "status"])
        return mlflow.search_runs(experiment_names=present, filter_string=filter_string)


def matrix_names(tracking_uri: str) -> list[str]:
    """Names of the matrices that have runs in the store (from the ``matrix`` tag), sorted."""
    frame = _search(tracking_uri, "tags.matrix != ''", None)
    return sorted(frame["tags.matrix"].dropna().unique()) if "tags.matrix" in frame else []


def _no_runs_message(tracking_uri: str, matrix: str, kind: str | None, where: str) -> str:
    known = matrix_names(tracking_uri)
    hint = f"{closest(matrix, known)} (matrices in this store: {', '.join(known)})" if known else \
        " (this store has no matrix runs yet)"
    kind_text = f" with ctlab.kind={kind}" if kind else ""
    return (f"no runs of matrix '{matrix}'{kind_text} in {where}of tracking store {tracking_uri}{hint}; "
            f"check the name and progress with `ctlab matrix status` and the store with --tracking-uri")


def run_params(row: pd.Series) -> dict[str, str]:
    """A run's params as ``{"model.attention": "flash", ...}`` (an efficiency run's ``config.`` prefix dropped)."""
    params = {}
    for column, value in row.items():
        if isinstance(column, str) and column.startswith("params.") and not pd.isna(value):
            key = column[len("params."):]
            params[key.removeprefix(_CONFIG_PREFIX)] = str(value)
    return params


def first_protocol(value: object) -> str | None:
    """The first entry of a logged ``eval.protocols`` param ("['ctclip', 'fixed0.5']" → "ctclip")."""
    if value is None or pd.isna(value):
        return None
    try:
        parsed = ast.literal_eval(str(value))
    except (ValueError, SyntaxError):
        parsed = str(value)
    if isinstance(parsed, list | tuple):
        return str(parsed[0]) if parsed else None
    return str(parsed)


def _tag(row: pd.Series, name: str) -> str | None:
    value = row.get(f"tags.{name}")
    return None if value is None or pd.isna(value) or str(value) == "" else str(value)


SEED_PARAMS = ("train.seed", "seed")  # the config key and its short search copy


def config_key(params: dict[str, str]) -> str:
    """A hash of the params that change a run's result, except its seed: equal for the seeds of one
    configuration, different for any two configurations."""
    semantic = {k: v for k, v in params.items() if not k.startswith(NON_SEMANTIC_KEYS) and k not in SEED_PARAMS
                and k not in SEARCH_AXES}
    return hashlib.sha256(json.dumps(semantic, sort_keys=True).encode()).hexdigest()[:12]


def _describe(frame: pd.DataFrame) -> pd.DataFrame:
    """Add config, component.* and protocol columns (see the module docstring)."""
    params = [run_params(row) for _, row in frame.iterrows()]
    components = [component_values(p) for p in params]
    out = frame.copy()
    out["config"] = [_tag(row, "cell_label") or config_label(c)
                     for (_, row), c in zip(frame.iterrows(), components, strict=True)]
    for axis in AXES:
        out[f"component.{axis}"] = [c[axis] for c in components]
    out["protocol"] = [first_protocol(p.get("eval.protocols")) for p in params]
    out["config_key"] = [config_key(p) for p in params]
    out["seed"] = [p.get("train.seed") for p in params]
    out["_rank"] = [component_rank(c) for c in components]
    labels = out.drop_duplicates("config_key")
    repeated = set(labels.loc[labels["config"].duplicated(keep=False), "config"])
    clash = out["config"].isin(repeated)
    out.loc[clash, "config"] = out.loc[clash, "config"] + " [" + out.loc[clash, "config_key"].str[:8] + "]"
    out["_seed"] = pd.to_numeric(out["seed"], errors="coerce")
    return out.sort_values(["_rank", "config", "_seed"], kind="stable").drop(columns=["_rank", "_seed"]) \
        .reset_index(drop=True)


def load_runs(tracking_uri: str, matrix: str, kind: str | None = "train",
              experiment_names: list[str] | None = None) -> pd.DataFrame:
    """The FINISHED runs of ``matrix`` (tag ``matrix``, tag ``ctlab.kind`` = ``kind`` unless None), newest per cell.

    Searches every experiment unless ``experiment_names`` is given. Raises
    ``NoRunsError`` naming the matrix, the store and the matrices it does
    hold when nothing matches. Runs left out because they are not FINISHED
    are counted in ``frame.attrs["left_out"]`` ({status: count}).
    """
    filters = [f"tags.matrix = {_quoted(matrix, 'matrix name')}"]
    if kind:
        filters.append(f"tags.`ctlab.kind` = {_quoted(kind, 'run kind')}")
    frame = _search(tracking_uri, " and ".join(filters), experiment_names)
    where = f"experiment(s) {', '.join(experiment_names)} " if experiment_names else ""
    if frame.empty:
        raise NoRunsError(_no_runs_message(tracking_uri, matrix, kind, where))
    finished = frame[frame["status"] == "FINISHED"]
    left_out = frame.loc[frame["status"] != "FINISHED", "status"].value_counts().to_dict()
    if finished.empty:
        counts = ", ".join(f"{n} {status}" for status, n in left_out.items())
        raise NoRunsError(f"matrix '{matrix}' has {len(frame)} run(s) in {where}{tracking_uri} but none FINISHED "
                          f"({counts}); wait for them or see `ctlab matrix status`")
    if left_out:
        log.info("matrix %s: left out %s run(s) that are not FINISHED", matrix, left_out)
    newest = finished.sort_values("start_time", ascending=False)
    newest = newest.assign(cell_id=[_tag(row, "cell_id") or row["run_id"] for _, row in newest.iterrows()])
    described = _describe(newest.drop_duplicates("cell_id", keep="first"))
    described.attrs = {"tracking_uri": tracking_uri, "matrix": matrix, "left_out": left_out}
    return described


def matrix_parent(tracking_uri: str, matrix: str) -> str | None:
    """The run id of the matrix's parent run (``ctlab.kind=matrix``, any status; the newest), or None."""
    frame = _search(tracking_uri, f"tags.matrix = {_quoted(matrix, 'matrix name')} and tags.`ctlab.kind` = 'matrix'",
                    None)
    return None if frame.empty else str(frame.sort_values("start_time")["run_id"].iloc[-1])


def declared_baseline(tracking_uri: str, parent_run_id: str) -> dict[str, str] | None:
    """The ``baseline:`` mapping ({dotted key: value}) of the matrix YAML logged on its parent run, if any."""
    client = MlflowClient(tracking_uri)
    for info in client.list_artifacts(parent_run_id):
        if info.is_dir or not info.path.endswith((".yaml", ".yml")):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(parent_run_id, info.path, tmp)
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("baseline"), dict):
            return {str(k): str(v) for k, v in data["baseline"].items()}
    return None


def artifact_frame(tracking_uri: str, run_id: str, name: str, optional: bool = False) -> pd.DataFrame | None:
    """The CSV artifact ``name`` of a run as a DataFrame; None when absent, with a warning naming it unless
    the artifact is ``optional`` (a readout older runs never logged; the caller reports it once)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, dst_path=tmp,
                                                       tracking_uri=tracking_uri)
        except (MlflowException, OSError) as err:
            (log.debug if optional else log.warning)("run %s has no artifact %s (%s)", run_id, name,
                                                     str(err).splitlines()[0] if str(err) else err)
            return None
        return pd.read_csv(Path(path))


def metric_history(tracking_uri: str, run_id: str, key: str) -> pd.DataFrame:
    """Every logged value of metric ``key`` of a run: columns step, value (one per step, the latest logged)."""
    history = MlflowClient(tracking_uri).get_metric_history(run_id, key)
    frame = pd.DataFrame([(m.step, m.value, m.timestamp) for m in history], columns=["step", "value", "timestamp"])
    frame = frame.sort_values(["step", "timestamp"]).drop_duplicates("step", keep="last")
    return frame[["step", "value"]].reset_index(drop=True)


def metric_histories(tracking_uri: str, runs: pd.DataFrame, key: str) -> pd.DataFrame:
    """``metric_history`` of every run in ``runs`` stacked: columns config, step, value."""
    parts = [metric_history(tracking_uri, row.run_id, key).assign(config=row.config) for row in runs.itertuples()]
    parts = [p for p in parts if not p.empty]
    if not parts:
        return pd.DataFrame(columns=["config", "step", "value"])
    return pd.concat(parts, ignore_index=True)[["config", "step", "value"]]
