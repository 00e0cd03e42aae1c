"""Where runs are stored: the tracking URI and the artifact folder beside a local store (no heavy imports)."""

from __future__ import annotations

import os
from pathlib import Path


def resolve_uri(uri: str | None) -> str:
    """The tracking URI to use: ``uri`` (a flag or the config) if given, else ``MLFLOW_TRACKING_URI``, else SQLite."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def artifact_root(uri: str) -> str | None:
    """For a SQLite or file store, the ``mlartifacts/`` folder beside it; None lets the server decide."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    if "://" not in uri:
        return (Path(uri).resolve() / "mlartifacts").as_uri()
    return None
