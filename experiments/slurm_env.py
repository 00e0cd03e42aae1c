"""Where this process runs inside SLURM: job id, array index and node, read from the job's environment.

Kept free of heavy imports so the worker loop can tag runs and claims with it on any machine.
"""

from __future__ import annotations

import os
import socket
from typing import Any

JOB_TAG, INDEX_TAG, NODE_TAG = "slurm.job_id", "slurm.array_index", "slurm.node"


def slurm_job_key(env: dict[str, str] | None = None) -> str | None:
    """The id ``squeue``/``scancel`` know this job by (``123_4`` for an array task), or None outside SLURM."""
    env = os.environ if env is None else env
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def slurm_identity(env: dict[str, str] | None = None) -> dict[str, str]:
    """Run tags for a SLURM job (job id, array index, node); empty when not running under SLURM."""
    env = os.environ if env is None else env
    job = slurm_job_key(env)
    if job is None:
        return {}
    return {JOB_TAG: job, INDEX_TAG: env.get("SLURM_ARRAY_TASK_ID", "0"),
            NODE_TAG: env.get("SLURMD_NODENAME") or socket.gethostname()}


def worker_detail(attrs: dict[str, Any]) -> str:
    """How ``matrix status`` names the holder of a running cell: its SLURM job and node, else host:pid."""
    if JOB_TAG in attrs:
        return f"job {attrs[JOB_TAG]} on {attrs.get(NODE_TAG, '?')}"
    return str(attrs.get("worker", ""))
