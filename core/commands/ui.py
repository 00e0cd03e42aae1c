"""``ctlab ui``: the MLflow UI on 127.0.0.1 over the same tracking store the runs used."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from core.registry import ConfigError
from core.stores import artifact_root, resolve_uri


def ui_command(uri: str, host: str, port: int, workers: int = 1) -> list[str]:
    """The ``mlflow ui`` command line for a tracking store (artifacts served from beside a local store)."""
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
               "--workers", str(workers)]
    if root := artifact_root(uri):
        command += ["--default-artifact-root", root]
    return command


def screenshot(uri: str, experiment: str, path: Path | None, port: int, parent_path: Path | None = None) -> str:
    """Start the UI, render the experiment's runs table headlessly to ``path`` (and its matrix parent run's
    report.md to ``parent_path``), stop the UI; returns the runs page's text."""
    from analysis.ui_snapshot import render_run_artifact, render_runs_page, wait_for_http
    from core.tracking import find_runs, get_client

    found = get_client(uri).get_experiment_by_name(experiment)
    if found is None:
        raise ConfigError(f"no experiment '{experiment}' in {uri}; run a matrix or name another with --experiment")
    parents = find_runs(uri, "tags.`ctlab.kind` = 'matrix'", experiment=experiment) if parent_path else []
    if parent_path and not parents:
        raise ConfigError(f"experiment '{experiment}' has no matrix parent run; run a matrix, then ctlab report")
    server = subprocess.Popen(ui_command(uri, "127.0.0.1", port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health")
        text = render_runs_page(f"http://127.0.0.1:{port}", found.experiment_id, path) if path else ""
        if parent_path:
            render_run_artifact(f"http://127.0.0.1:{port}", found.experiment_id, parents[0].info.run_id, parent_path)
        return text
    finally:
        server.terminate()
        server.wait(timeout=30)


def run(args: argparse.Namespace) -> int:
    """Serve the UI in the foreground and print its URL, or save a screenshot of one experiment and exit."""
    uri = resolve_uri(args.tracking_uri)
    if args.screenshot or args.parent_screenshot:
        from analysis.ui_snapshot import find_chromium

        try:
            find_chromium()
        except FileNotFoundError as err:
            if args.if_chromium:
                print(f"skipped the MLflow UI screenshot: {err}")
                return 0
            raise ConfigError(f"{err} (or pass --if-chromium to skip the screenshot)") from None
        screenshot(uri, args.experiment, args.screenshot and Path(args.screenshot), args.port,
                   args.parent_screenshot and Path(args.parent_screenshot))
        for path, what in ((args.screenshot, "runs table"), (args.parent_screenshot, "matrix parent run's report.md")):
            if path:
                print(f"{what} of experiment '{args.experiment}' saved to {path}")
        return 0
    print(f"MLflow UI for {uri}: http://{args.host}:{args.port}  (Ctrl-C to stop)", flush=True)
    try:
        return subprocess.call(ui_command(uri, args.host, args.port, args.workers),
                               env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    except KeyboardInterrupt:
        return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``ui`` subcommand."""
    parser = subparsers.add_parser("ui", help="browse every run in the MLflow UI",
                                   description="Start `mlflow ui` on the tracking store the runs used.")
    parser.add_argument("--tracking-uri",
                        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    parser.add_argument("--workers", type=int, default=1, help="server worker processes (default 1)")
    parser.add_argument("--screenshot", metavar="PNG",
                        help="instead of serving: render the runs table of --experiment with headless Chromium")
    parser.add_argument("--parent-screenshot", metavar="PNG",
                        help="instead of serving: render the Artifacts tab of --experiment's matrix parent run, "
                             "previewing the report.md that `ctlab report` logged there")
    parser.add_argument("--experiment", default="smoke", help="experiment to render with --screenshot")
    parser.add_argument("--if-chromium", action="store_true",
                        help="with --screenshot: skip it with one line (exit 0) when Chromium is not installed")
    parser.set_defaults(func=run)
