"""Train one matrix cell under ``torchrun --nproc_per_node N`` (a worker that holds N GPUs), DDP as ``ctlab train``.

The worker writes the cell's resolved config to its run folder and starts
``torchrun ... -m experiments.torchrun_cell CONFIG --parent-run-id ID --tag k=v``;
rank 0 logs to MLflow and checkpoints, so the cell resumes like an in-process one.
The worker then reads the metrics of the run the ranks finished.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

from core.config import Config, load_config, save_config
from core.tracking import FINISHED, find_runs


def torchrun_command(config_path: str, nproc: int, parent_run_id: str | None, tags: dict[str, str]) -> list[str]:
    """The command line that trains ``config_path`` on ``nproc`` local processes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "experiments.torchrun_cell", config_path, "--tags", json.dumps(tags)]
    if parent_run_id:
        command += ["--parent-run-id", parent_run_id]
    return command


def train_with_torchrun(cfg: Config, nproc: int, parent_run_id: str | None, tags: dict[str, str]) -> dict[str, Any]:
    """Train ``cfg`` (resuming its checkpoint) on ``nproc`` processes; the metrics of its FINISHED run."""
    from core.train import run_dir_for

    run_dir = run_dir_for(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = save_config(cfg, run_dir / "cell.yaml")
    started_ms = int(time.time() * 1000)
    proc = subprocess.Popen(torchrun_command(str(config_path), nproc, parent_run_id, tags))
    try:
        code = proc.wait()
    except BaseException:  # interrupted (preemption, scancel): stop the ranks before giving the cell back
        proc.terminate()
        proc.wait(timeout=60)
        raise
    cell_runs = f"tags.cell_id = '{tags['cell_id']}' and tags.matrix = '{tags['matrix']}'"
    if code != 0:
        reasons = [r.data.tags["failure_reason"] for r in find_runs(cfg.tracking.uri, cell_runs, statuses=("FAILED",))
                   if "failure_reason" in r.data.tags and (r.info.end_time or 0) >= started_ms]
        cause = f": rank 0 failed with {reasons[0]}" if reasons else " (the ranks' errors are in this worker's log)"
        raise RuntimeError(f"torchrun --nproc_per_node={nproc} exited with status {code} for {cfg.name}{cause}")
    runs = find_runs(cfg.tracking.uri, cell_runs, statuses=(FINISHED,))
    if not runs:
        raise RuntimeError(f"torchrun finished {cfg.name} but no FINISHED MLflow run carries its cell id")
    return dict(runs[0].data.metrics)


def main(argv: list[str] | None = None) -> int:
    """Entry point of each torchrun rank: train the config file with resume, parent run and tags."""
    parser = argparse.ArgumentParser(description="one rank of a matrix cell trained under torchrun")
    parser.add_argument("config")
    parser.add_argument("--parent-run-id")
    parser.add_argument("--tags", default="{}", help="JSON object of run tags")
    args = parser.parse_args(argv)
    from core.train import train

    train(load_config(args.config), resume=True, parent_run_id=args.parent_run_id, tags=json.loads(args.tags),
          progress=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
