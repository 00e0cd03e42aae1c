"""``ctlab ui``: the MLflow UI on 127.0.0.1 over the same tracking store the runs used."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from core.tracking import artifact_root, resolve_uri


def ui_command(uri: str, host: str, port: int) -> list[str]:
    """The ``mlflow ui`` command line for a tracking store (artifacts served from beside a local store)."""
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    if root := artifact_root(uri):
        command += ["--default-artifact-root", root]
    return command


def run(args: argparse.Namespace) -> int:
    """Start the UI in the foreground and print its URL."""
    uri = resolve_uri(args.tracking_uri)
    print(f"MLflow UI for {uri}: http://{args.host}:{args.port}  (Ctrl-C to stop)", flush=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    try:
        return subprocess.call(ui_command(uri, args.host, args.port), env=env)
    except KeyboardInterrupt:
        return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``ui`` subcommand."""
    parser = subparsers.add_parser("ui", help="browse every run in the MLflow UI",
                                   description="Start `mlflow ui` on the tracking store the runs used.")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    parser.set_defaults(func=run)
