"""Run a matrix's workers as a SLURM job array through submitit (``ctlab matrix run FILE --launcher slurm``).

Each array task runs the ordinary worker loop (``experiments.launcher.work``)
against the shared Optuna storage and MLflow store, so SLURM only decides
where and when workers run; which cell each trains is still settled by the
claims in the storage. Cluster settings come from flags and from a ``slurm:``
block in the matrix YAML (flags win)::

    slurm:
      partition: gpu
      time: "12:00:00"          # time limit per worker job: minutes, H:MM:SS or D-HH:MM:SS
      gpus_per_worker: 4        # > 1: each cell trains under torchrun --nproc_per_node 4
      cpus_per_worker: 16
      mem: 128G
      account: my-lab
      qos: normal
      sbatch: ["--constraint=h100", "--exclusive"]     # extra #SBATCH lines
      setup: ["module load cuda/12.4"]                 # shell lines run before the worker
      log_dir: slurm-logs       # submitit's folder: job scripts, pickles, stdout/stderr (shared filesystem)

Interruptions: SLURM's time-limit/preemption signal (USR2, ``signal_delay_s``
before the end) reaches submitit's checkpoint hook, which stops the cell at the
current step, saves its checkpoint, gives the cell back and requeues the job.
SIGTERM (``scancel``, ``scontrol requeue``, preemption) saves and gives the cell
back the same way without requeueing (SLURM requeues when it means to). A
requeued job reclaims nothing twice: a claim left RUNNING by the same job id
is released at start (SLURM never runs one job id twice at once), and a job
killed outright is covered by the storage's heartbeats.
"""

from __future__ import annotations

import logging
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from core.interrupts import STEP_BOUNDARY
from core.registry import ConfigError, closest
from experiments.slurm_env import JOB_TAG, slurm_job_key

log = logging.getLogger(__name__)
SERVER_RECIPE = ("mlflow server --backend-store-uri postgresql://USER@DBHOST/mlflow "
                 "--artifacts-destination /shared/mlartifacts --serve-artifacts --host 0.0.0.0 --port 5000")


@dataclass
class SlurmOptions:
    """What a cluster asks of each worker job (one array task = one worker)."""

    partition: str | None = None
    time: str = "24:00:00"
    gpus_per_worker: int = 0
    cpus_per_worker: int | None = None
    mem: str | None = None
    account: str | None = None
    qos: str | None = None
    sbatch: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)
    log_dir: str = "slurm-logs"
    signal_delay_s: int = 120
    job_name: str | None = None


SLURM_KEYS = tuple(f.name for f in fields(SlurmOptions))
_INT_KEYS = ("gpus_per_worker", "cpus_per_worker", "signal_delay_s")
_LIST_KEYS = ("sbatch", "setup")


def slurm_options(block: dict[str, Any] | None, overrides: dict[str, Any] | None = None) -> SlurmOptions:
    """Validate a ``slurm:`` block (unknown keys and bad values are errors naming the fix), then apply flags."""
    if block is not None and not isinstance(block, dict):
        raise ConfigError("matrix 'slurm' must be a mapping of SLURM settings, e.g. {partition: gpu, time: '4:00:00'}")
    block = dict(block or {})
    for key in block:
        if key not in SLURM_KEYS:
            raise ConfigError(f"slurm: unknown key '{key}'{closest(key, SLURM_KEYS)} "
                              f"(valid keys: {', '.join(SLURM_KEYS)})")
    values = {**block, **{k: v for k, v in (overrides or {}).items() if v is not None and v != []}}
    for key in _INT_KEYS:
        if values.get(key) is not None:
            value = values[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"slurm.{key} must be a whole number >= 0, got {value!r}")
    for key in _LIST_KEYS:
        if key in values:
            value = values[key]
            values[key] = [value] if isinstance(value, str) else value
            if not isinstance(values[key], list) or not all(isinstance(v, str) for v in values[key]):
                raise ConfigError(f"slurm.{key} must be a list of strings, got {value!r}")
    for key in ("partition", "mem", "account", "qos", "log_dir", "job_name", "time"):
        if values.get(key) is not None:
            values[key] = str(values[key])
    opts = SlurmOptions(**values)
    time_minutes(opts.time)
    sbatch_parameters(opts.sbatch)
    return opts


def time_minutes(text: str | int) -> int:
    """A SLURM time limit (minutes, MM:SS, H:MM:SS, D-H, D-H:MM, D-H:MM:SS) in whole minutes (at least 1)."""
    raw = str(text).strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", raw)
    if not match:
        raise ConfigError(f"slurm.time '{raw}' is not a SLURM time limit; write minutes, H:MM:SS or D-HH:MM:SS")
    days, a, b, c = match.groups()
    parts = [int(p) for p in (a, b, c) if p is not None]
    if days is not None:  # D-H[:M[:S]]
        hours, minutes, seconds = (parts + [0, 0])[:3]
        total = int(days) * 1440 + hours * 60 + minutes + seconds / 60
    elif len(parts) == 1:
        total = parts[0]
    elif len(parts) == 2:  # MM:SS
        total = parts[0] + parts[1] / 60
    else:
        total = parts[0] * 60 + parts[1] + parts[2] / 60
    return max(1, round(total))


def sbatch_parameters(lines: list[str]) -> dict[str, Any]:
    """Extra ``#SBATCH`` lines (``--constraint=h100``, ``#SBATCH --exclusive``) as submitit's additional parameters."""
    params: dict[str, Any] = {}
    for line in lines:
        text = line.strip()
        text = text[len("#SBATCH"):].strip() if text.startswith("#SBATCH") else text
        match = re.fullmatch(r"--([A-Za-z][A-Za-z0-9-]*)(?:[= ](.+))?", text)
        if not match:
            raise ConfigError(f"slurm.sbatch line '{line}' is not an sbatch option; write it as --name=value or --flag")
        name, value = match.groups()
        params[name.replace("-", "_")] = True if value is None else value.strip()
    return params


# ------------------------------------------------------------------ checks before anything is submitted


def _scheme(uri: str) -> str:
    return uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""


def _local_location(location: str) -> bool:
    return urlparse(location).scheme in ("", "file")


def _tracking_problems(uri: str, experiments: set[str]) -> list[str]:
    scheme = _scheme(uri)
    if scheme in ("", "sqlite", "file"):
        return [f"MLflow tracking URI '{uri}' is a file on this machine; workers on other nodes cannot log to it. "
                f"Start a tracking server ({SERVER_RECIPE}) and pass --tracking-uri http://HOST:5000"]
    if scheme in ("http", "https"):  # a tracking server: reachable now (MLflow's client would retry for minutes)
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=15):
                return []
        except OSError as err:
            return [f"MLflow tracking server {uri} does not answer ({err}); start it ({SERVER_RECIPE}) "
                    "or fix --tracking-uri"]
    from core.tracking import get_client

    client = get_client(uri)
    try:
        found = {name: client.get_experiment_by_name(name) for name in sorted(experiments)}
    except Exception as err:  # the database cannot be reached
        return [f"MLflow tracking URI '{uri}' cannot be reached ({type(err).__name__}: {str(err)[:200]}); "
                f"fix --tracking-uri, or start a tracking server ({SERVER_RECIPE})"]
    problems = []
    for name, experiment in found.items():
        location = experiment.artifact_location if experiment else "./mlruns (created on first use)"
        if experiment is None or _local_location(location):
            problems.append(f"MLflow experiment '{name}' keeps artifacts at {location}, a local path other nodes "
                            f"cannot read; put a tracking server in front of the database ({SERVER_RECIPE}) and "
                            "pass --tracking-uri http://HOST:5000, so artifacts travel over HTTP")
    return problems


def cluster_problems(storage: str, tracking_uris: set[str], experiments: set[str]) -> list[str]:
    """Every reason the shared state or this machine cannot run SLURM workers, each with its fix."""
    problems = []
    if _scheme(storage) in ("", "sqlite"):
        problems.append(f"Optuna storage '{storage}' is a SQLite file; workers on several nodes need one database "
                        "server: pass --storage postgresql+psycopg://USER@DBHOST/optuna")
    for uri in sorted(tracking_uris):
        problems += _tracking_problems(uri, experiments)
    if shutil.which("sbatch") is None:
        problems.append("'sbatch' is not on PATH: submit from a SLURM login node (or load its module), "
                        "or run the workers here with --launcher local")
    return problems


def check_cluster_setup(matrix: Any, storage: str, tracking_uri: str | None) -> None:
    """Raise ConfigError listing every problem before a job is submitted (nothing is started on failure)."""
    from core.stores import resolve_uri

    uris = {resolve_uri(tracking_uri or cell.config.tracking.uri) for cell in matrix.runnable}
    experiments = {cell.config.tracking.experiment for cell in matrix.runnable}
    problems = cluster_problems(storage, uris, experiments)
    if problems:
        raise ConfigError("--launcher slurm cannot start:\n  - " + "\n  - ".join(problems))


# ------------------------------------------------------------------ the worker job


class WorkerInterrupted(KeyboardInterrupt):
    """SLURM asked the worker to stop; training saves its checkpoint on the way out (a KeyboardInterrupt)."""

    def __init__(self, reason: str, requeue: bool) -> None:
        super().__init__(reason)
        self.reason, self.requeue = reason, requeue


class SlurmWorker:
    """One array task: the worker loop on a matrix file, with submitit's checkpoint hook for requeueing."""

    def __init__(self, matrix_path: str, launch: dict[str, Any]) -> None:
        self.matrix_path = matrix_path
        self.launch = launch
        self._interrupted = False

    def __call__(self, index: int) -> dict[str, int]:
        """Claim and train cells until the matrix is resolved; returns the count of cells per state."""
        from experiments.launcher import LaunchOptions, open_storage, open_study, work
        from experiments.matrix import load_matrix

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._interrupted = False
        signal.signal(signal.SIGTERM, self._on_sigterm)  # submitit ignores it; here it stops the cell cleanly
        signal.signal(preemption_signal(), self._on_time_limit)  # in place of submitit's, which raises mid-step
        opts = LaunchOptions(**self.launch)
        matrix = load_matrix(self.matrix_path)
        storage = open_storage(opts)
        release_own_claims(matrix, storage, open_study(matrix, storage))
        try:
            states = work(matrix, opts)
        except WorkerInterrupted as stop:
            log.warning("worker %s (array index %d) stopped: %s", slurm_job_key(), index, stop.reason)
            if stop.requeue and (job := slurm_job_key()):
                subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
                log.warning("requeued job %s; its cell resumes from its checkpoint", job)
            return {"interrupted": 1}
        counts: dict[str, int] = {}
        for state, _ in states.values():
            counts[state] = counts.get(state, 0) + 1
        return counts

    def _stop(self, reason: str, requeue: bool) -> None:
        if self._interrupted:  # already stopping: let the checkpoint finish
            return
        self._interrupted = True
        # when the signal arrived, apart from when the stop completes (the step in flight ends first)
        log.warning("worker %s: stop requested by %s; the cell stops at the end of its current step", slurm_job_key(),
                    reason)
        STEP_BOUNDARY.interrupt(WorkerInterrupted(reason, requeue))  # a training step in flight completes first

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._stop("SIGTERM (scancel, scontrol requeue or preemption)", requeue=False)

    def _on_time_limit(self, signum: int, frame: Any) -> None:
        self._stop("time limit or preemption signal", requeue=True)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's hook on the time-limit / preemption signal: stop at this step, save, give back, requeue."""
        self._stop("time limit or preemption signal", requeue=True)


def preemption_signal() -> signal.Signals:
    """The signal SLURM sends ``signal_delay_s`` before the time limit (submitit's choice, USR2 by default)."""
    from submitit.core.job_environment import JobEnvironment

    return JobEnvironment._usr_sig()


def release_own_claims(matrix: Any, storage: Any, study: Any) -> list[str]:
    """Give back cells whose claim this SLURM job id still holds: an earlier run of this requeued job died."""
    from optuna.trial import TrialState

    from experiments.launcher import _claims

    job = slurm_job_key()
    if job is None:
        return []
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    released = []
    for cell_id, attempts in _claims(storage, matrix.name).items():
        attrs = attempts[-1].user_attrs
        trial = trials.get(attrs.get("trial_number"))
        if attrs.get(JOB_TAG) == job and trial is not None and trial.state == TrialState.RUNNING:
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            released.append(cell_id)
            log.warning("cell %s was held by an earlier run of job %s; handed back to resume", cell_id, job)
    return released


# ------------------------------------------------------------------ submission


def make_executor(slurm: SlurmOptions, workers: int, name: str) -> Any:
    """A submitit SlurmExecutor with the cluster settings applied."""
    import submitit

    executor = submitit.SlurmExecutor(folder=Path(slurm.log_dir) / "%j", python=sys.executable)
    params: dict[str, Any] = {
        "job_name": slurm.job_name or f"ctlab-{name}", "time": time_minutes(slurm.time), "nodes": 1,
        "ntasks_per_node": 1, "signal_delay_s": slurm.signal_delay_s, "array_parallelism": workers,
        "partition": slurm.partition, "cpus_per_task": slurm.cpus_per_worker, "mem": slurm.mem,
        "account": slurm.account, "qos": slurm.qos, "gpus_per_node": slurm.gpus_per_worker or None,
        "setup": slurm.setup or None, "additional_parameters": sbatch_parameters(slurm.sbatch) or None,
    }
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def worker_launch(opts: Any, slurm: SlurmOptions) -> dict[str, Any]:
    """The launch options each worker job runs with: the submitter's stores and heartbeats, no progress bars (a
    log file, not a terminal), and each cell trained by one process per GPU of the job (torchrun when > 1)."""
    return {**asdict(opts), "progress": False, "nproc_per_cell": max(1, slurm.gpus_per_worker)}


def submit(matrix: Any, opts: Any, slurm: SlurmOptions, workers: int) -> list[str]:
    """Check the setup, prepare data and shared state, then submit ``workers`` array tasks; their job ids."""
    from experiments.launcher import open_storage, open_study, parent_run_id, prepare_data

    if matrix.path is None:
        raise ConfigError("--launcher slurm needs the matrix as a file the worker jobs can read")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1 for --launcher slurm, got {workers}")
    check_cluster_setup(matrix, opts.storage, opts.tracking_uri)
    prepare_data(matrix, opts.progress)
    storage = open_storage(opts)  # tables, study and parent run exist before any worker starts
    open_study(matrix, storage)
    parent_run_id(matrix, storage, opts.tracking_uri)
    launch = worker_launch(opts, slurm)
    executor = make_executor(slurm, workers, matrix.name)
    jobs = executor.map_array(SlurmWorker(str(Path(matrix.path).resolve()), launch), list(range(workers)))
    return [job.job_id for job in jobs]
