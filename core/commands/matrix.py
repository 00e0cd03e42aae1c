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
    if args.launcher == "slurm":
        return _submit_slurm(matrix, args)
    status = launch(matrix, _options(args), workers=args.workers, matrix_path=args.file)
    if args.workers != 1 or status == 0:
        print_status(matrix, _options(args))
    return status


def _submit_slurm(matrix, args: argparse.Namespace) -> int:
    """Submit the workers as a SLURM job array, print the job ids and how to watch them, and return."""
    from experiments.slurm import slurm_options, submit

    flags = {"partition": args.partition, "time": args.time, "gpus_per_worker": args.gpus_per_worker,
             "cpus_per_worker": args.cpus_per_worker, "mem": args.mem, "account": args.account, "qos": args.qos,
             "sbatch": args.sbatch, "setup": args.setup, "log_dir": args.slurm_logs}
    slurm = slurm_options(matrix.raw.get("slurm"), flags)
    jobs = submit(matrix, _options(args), slurm, args.workers)
    print(f"submitted {len(jobs)} SLURM worker job(s): {' '.join(jobs)}")
    print(f"  logs: {slurm.log_dir}/<job id>/   watch: squeue --me; ctlab matrix status {args.file} "
          f"--storage {args.storage}" + (f" --tracking-uri {args.tracking_uri}" if args.tracking_uri else ""))
    return 0


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
            sub.add_argument("--workers", type=int, default=1,
                             help="worker processes on this machine, or SLURM array tasks with --launcher slurm")
            _add_slurm_arguments(sub)
        sub.set_defaults(func=func)




def _add_slurm_arguments(parser: argparse.ArgumentParser) -> None:
    """``--launcher`` and the cluster settings; each overrides the matrix YAML's ``slurm:`` block."""
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local",
                        help="local: worker processes here (default); slurm: a SLURM job array through submitit")
    group = parser.add_argument_group("SLURM (with --launcher slurm; default: the matrix's slurm: block)")
    group.add_argument("--partition", help="partition to submit to")
    group.add_argument("--time", help="time limit per worker job: minutes, H:MM:SS or D-HH:MM:SS (default 24:00:00)")
    group.add_argument("--gpus-per-worker", type=int,
                       help="GPUs per worker job; > 1 trains each cell with torchrun --nproc_per_node N")
    group.add_argument("--cpus-per-worker", type=int, help="CPUs per worker job")
    group.add_argument("--mem", help="memory per worker job, e.g. 64G")
    group.add_argument("--account", help="SLURM account to charge")
    group.add_argument("--qos", help="quality of service")
    group.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                       help="extra #SBATCH option, e.g. --sbatch=--constraint=h100 (repeatable)")
    group.add_argument("--setup", action="append", default=[], metavar="LINE",
                       help="shell line run in the job before the worker, e.g. 'module load cuda' (repeatable)")
    group.add_argument("--slurm-logs", help="folder for job scripts and logs, on a shared filesystem "
                                            "(default slurm-logs)")
