"""``ctlab matrix run|status|list FILE``: launch an ablation matrix on any number of workers, and watch it."""

from __future__ import annotations

import argparse


def _options(args: argparse.Namespace):
    from experiments.launcher import LaunchOptions

    return LaunchOptions(storage=args.storage, tracking_uri=args.tracking_uri, heartbeat_s=args.heartbeat,
                         grace_s=args.grace, progress=not args.no_progress)


def run(args: argparse.Namespace) -> int:
    """Expand, validate, then claim and train cells until the matrix is resolved; print the status table."""
    from experiments.launcher import launch
    from experiments.matrix import load_matrix
    from experiments.status import print_status

    matrix = load_matrix(args.file)
    skipped = [c for c in matrix.cells if not c.runnable]
    print(f"matrix '{matrix.name}': {len(matrix.cells)} cells, {len(matrix.runnable)} to run, {len(skipped)} skipped")
    for cell in skipped:
        print(f"  skipped {cell.cell_id} ({cell.label}): {cell.skip_reason}")
    status = launch(matrix, _options(args), workers=args.workers, matrix_path=args.file)
    if args.workers != 1 or status == 0:
        print_status(matrix, _options(args))
    return status


def status(args: argparse.Namespace) -> int:
    """Print each cell's state and key metrics."""
    from experiments.matrix import load_matrix
    from experiments.status import print_status

    print_status(load_matrix(args.file), _options(args))
    return 0


def list_cells(args: argparse.Namespace) -> int:
    """Print the expanded cells without running anything."""
    from experiments.matrix import load_matrix

    matrix = load_matrix(args.file)
    for cell in matrix.cells:
        state = f"skipped: {cell.skip_reason}" if cell.skip_reason else "runnable"
        print(f"{cell.cell_id}  {cell.label:<32}  {cell.assignment}  {state}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``matrix`` with its ``run``, ``status`` and ``list`` actions."""
    parser = subparsers.add_parser(
        "matrix", help="launch and watch an ablation matrix",
        description="Ablation matrices: a base config × axes, one MLflow child run per cell.")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, func, help_text in (
        ("run", run, "claim and train cells (run it on as many machines as you like)"),
        ("status", status, "table of cells: done / running / failed (reason) / pending / skipped"),
        ("list", list_cells, "show the expanded cells and which are skipped, without running"),
    ):
        sub = actions.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("file", help="matrix YAML, e.g. experiments/smoke.yaml")
        sub.add_argument("--storage", default="sqlite:///optuna.db",
                         help="Optuna RDB storage shared by workers (default sqlite:///optuna.db; "
                              "postgresql://... for several machines)")
        sub.add_argument("--tracking-uri", help="MLflow tracking URI (default: the config's, sqlite:///mlflow.db)")
        sub.add_argument("--heartbeat", type=int, default=10, help="worker heartbeat interval in seconds")
        sub.add_argument("--grace", type=int, default=30,
                         help="seconds without heartbeat after which a worker's cell is handed out again")
        sub.add_argument("--no-progress", action="store_true", help="no progress bars")
        if name == "run":
            sub.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1)")
        sub.set_defaults(func=func)


