"""`ctlab matrix run --launcher slurm`: settings, checks before submitting, and whole matrices on a real SLURM cluster
(.ci/slurm.sh) with an MLflow tracking server on PostgreSQL (.ci/postgres.sh): every cell once, scancel, requeue and
the time-limit signal resume cells from their checkpoint step."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from analysis.ui_snapshot import free_port, wait_for_http
from core.cli import main
from core.data import PATHOLOGIES
from core.registry import ConfigError
from core.tracking import find_runs
from experiments.launcher import LaunchOptions
from experiments.matrix import load_matrix
from experiments.slurm import make_executor, sbatch_parameters, slurm_options, time_minutes, worker_launch
from experiments.slurm_env import slurm_identity, worker_detail
from experiments.status import status_table
from tests.run_fixtures import tiny_run
from tests.services import StepGate, postgres_databases

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ settings (fast)


def test_slurm_block_is_strict_and_flags_override_it():
    opts = slurm_options({"partition": "gpu", "time": "2:00:00", "gpus_per_worker": 4, "sbatch": "--exclusive"},
                         {"partition": "debug", "mem": "64G", "sbatch": []})
    assert (opts.partition, opts.time, opts.gpus_per_worker, opts.mem, opts.sbatch) == \
        ("debug", "2:00:00", 4, "64G", ["--exclusive"])
    with pytest.raises(ConfigError, match="unknown key 'gpus_per_node'; did you mean 'gpus_per_worker'"):
        slurm_options({"gpus_per_node": 2})
    with pytest.raises(ConfigError, match="slurm.cpus_per_worker must be a whole number"):
        slurm_options({"cpus_per_worker": "8"})
    with pytest.raises(ConfigError, match="slurm.time '90 minutes' is not a SLURM time limit"):
        slurm_options({"time": "90 minutes"})
    with pytest.raises(ConfigError, match="unknown key 'partion'; did you mean 'partition'"):
        load_matrix({"name": "m", "base": {}, "axes": {"model.loss": ["clip"]}, "slurm": {"partion": "gpu"}})


@pytest.mark.parametrize(("text", "minutes"), [("90", 90), ("1:30:00", 90), ("2-00", 2880), ("1-02:30:00", 1590),
                                               ("45:30", 46), ("0:00:10", 1)])
def test_time_limits_in_slurm_formats(text, minutes):
    assert time_minutes(text) == minutes


def test_sbatch_script_carries_the_cluster_settings(tmp_path):
    from submitit.slurm.slurm import _make_sbatch_string

    assert sbatch_parameters(["#SBATCH --constraint=h100", "--exclusive", "--reservation big"]) == \
        {"constraint": "h100", "exclusive": True, "reservation": "big"}
    with pytest.raises(ConfigError, match="not an sbatch option"):
        sbatch_parameters(["constraint=h100"])
    opts = slurm_options({"partition": "gpu", "time": "1-00:00:00", "gpus_per_worker": 4, "cpus_per_worker": 16,
                          "mem": "128G", "account": "lab", "qos": "high", "sbatch": ["--constraint=h100"],
                          "setup": ["module load cuda"], "log_dir": str(tmp_path)})
    executor = make_executor(opts, workers=3, name="paper")
    script = _make_sbatch_string(command="python -m worker", folder=tmp_path / "%j", map_count=3,
                                 **executor.parameters)
    for line in ("--partition=gpu", "--time=1440", "--gpus-per-node=4", "--cpus-per-task=16", "--mem=128G",
                 "--account=lab", "--qos=high", "--constraint=h100", "--array=0-2%3", "--job-name=ctlab-paper",
                 "--signal=USR2@120"):
        assert f"#SBATCH {line}\n" in script
    assert "module load cuda" in script


def test_worker_jobs_train_each_cell_with_one_process_per_gpu():
    opts = LaunchOptions(storage="postgresql+psycopg://db/optuna", tracking_uri="http://mlflow:5000", heartbeat_s=7)
    four = LaunchOptions(**worker_launch(opts, slurm_options({"gpus_per_worker": 4})))
    assert (four.nproc_per_cell, four.progress, four.storage, four.tracking_uri, four.heartbeat_s) == \
        (4, False, opts.storage, opts.tracking_uri, 7)
    assert LaunchOptions(**worker_launch(opts, slurm_options({}))).nproc_per_cell == 1  # CPU-only: in-process
    assert LaunchOptions(**worker_launch(opts, slurm_options({"gpus_per_worker": 1}))).nproc_per_cell == 1


def test_runs_and_status_name_the_job_and_node():
    env = {"SLURM_JOB_ID": "812", "SLURM_ARRAY_JOB_ID": "810", "SLURM_ARRAY_TASK_ID": "2", "SLURMD_NODENAME": "gpu07"}
    tags = slurm_identity(env)
    assert tags == {"slurm.job_id": "810_2", "slurm.array_index": "2", "slurm.node": "gpu07"}
    assert worker_detail({**tags, "worker": "gpu07:4242"}) == "job 810_2 on gpu07"
    assert slurm_identity({}) == {} and worker_detail({"worker": "laptop:11"}) == "laptop:11"


def test_requeued_job_hands_back_the_cell_its_earlier_run_held(tmp_path, monkeypatch):
    from experiments.launcher import cell_states, open_storage, open_study, try_claim
    from experiments.slurm import release_own_claims

    matrix = load_matrix({"name": "requeued", "base": {}, "axes": {"model.loss": ["clip", "siglip"]}})
    opts = LaunchOptions(storage=f"sqlite:///{tmp_path}/optuna.db")
    storage = open_storage(opts)
    study = open_study(matrix, storage)
    cell = matrix.runnable[0].cell_id
    for key, value in {"SLURM_JOB_ID": "41", "SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "1",
                       "SLURMD_NODENAME": "gpu03"}.items():
        monkeypatch.setenv(key, value)
    assert try_claim(storage, matrix, study, cell, study.ask().number)
    assert cell_states(matrix, storage, study)[cell] == ("running", "job 40_1 on gpu03")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")  # another job of the array: the cell is not its to release
    assert release_own_claims(matrix, storage, study) == []
    assert cell_states(matrix, storage, study)[cell][0] == "running"
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")  # the same job id, started again by a requeue
    assert release_own_claims(matrix, storage, study) == [cell]
    assert cell_states(matrix, storage, study)[cell] == ("pending", "retry after attempt 1")


# ------------------------------------------------------------------ the cluster


@pytest.fixture(scope="module")
def cluster() -> str:
    """The SLURM cluster .ci/slurm.sh starts (its node idle or busy); skipped without `sinfo`."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        if os.environ.get("CTLAB_REQUIRE_SERVICES"):
            pytest.fail("CTLAB_REQUIRE_SERVICES is set but sinfo/sbatch are missing: .ci/slurm.sh did not run")
        pytest.skip("no SLURM here (`sinfo` is not on PATH); bash .ci/slurm.sh installs and starts one")
    states = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30).stdout.split()
    if not any(s.rstrip("*") in ("idle", "mix", "alloc") for s in states):
        pytest.fail(f"SLURM has no usable node (sinfo states: {states}); run bash .ci/slurm.sh")
    return states[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> dict:
    """An `mlflow server` on a fresh PostgreSQL database serving artifacts over HTTP, plus a database maker."""
    with postgres_databases("ctlab_slurm") as database:
        folder = tmp_path_factory.mktemp("mlflow-server")
        port = free_port()
        log = (folder / "server.log").open("w")
        proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                                 database(), "--artifacts-destination", str(folder / "artifacts"), "--serve-artifacts",
                                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        uri = f"http://127.0.0.1:{port}"
        try:
            wait_for_http(f"{uri}/health", timeout=180)
        except TimeoutError:
            proc.kill()
            pytest.fail(f"mlflow server did not start: {(folder / 'server.log').read_text()[-2000:]}")
        yield {"uri": uri, "database": database, "artifacts": folder / "artifacts"}
        os.killpg(proc.pid, 9)  # a throw-away server: no graceful shutdown to wait for
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("synthetic")
    assert main(["data", "synth", "--out", str(folder / "root"), "--train", "8", "--valid", "8", "--seed", "3",
                 "--shape", "16", "32", "32", "--workers", "1", "--no-progress"]) == 0
    return folder


def _write(tmp_path: Path, name: str, base: dict, axes: dict, **fields) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "base": base, "axes": axes, **fields}))
    return path


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _ctlab(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "core.cli", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _submit(path: Path, tracking: str, storage: str, workers: int, *extra: str) -> list[str]:
    result = _ctlab("matrix", "run", str(path), "--launcher", "slurm", "--workers", str(workers), "--tracking-uri",
                    tracking, "--storage", storage, "--heartbeat", "2", "--grace", "6", "--no-progress",
                    "--time", "20", "--cpus-per-worker", "1", "--slurm-logs", str(path.parent / "slurm-logs"),
                    *extra, cwd=path.parent)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    match = re.search(r"submitted \d+ SLURM worker job\(s\): (.+)", result.stdout)
    assert match, result.stdout
    return match.group(1).split()


def _queued(array_id: str) -> list[str]:
    """The array's tasks still queued; a requeued task SLURM holds back (its begin time is set ~3 minutes ahead)
    is made eligible now, so the test does not sit out that delay."""
    out = subprocess.run(["squeue", "-h", "-r", "-j", array_id, "-o", "%i %T %r"], capture_output=True, text=True,
                         timeout=30)
    lines = out.stdout.strip().splitlines()
    for line in lines:
        job, state, reason = (line.split() + ["", ""])[:3]
        if state == "PENDING" and reason == "BeginTime":
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], timeout=30)
    return lines


def _logs(folder: Path, tail: int | None = 3000) -> str:
    """The workers' logs: the last ``tail`` characters of each (a failure message), or all of each (None)."""
    texts = {p.name: p.read_text() for p in sorted(folder.rglob("*.err"))}
    return "\n".join(f"== {name}\n{text[-tail:] if tail else text}" for name, text in texts.items())


def _wait_done(array_id: str, logs: Path, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while _queued(array_id):
        if time.time() > deadline:
            subprocess.run(["scancel", array_id], timeout=30)
            pytest.fail(f"SLURM jobs {array_id} still queued after {timeout:.0f} s:\n{_logs(logs)}")
        time.sleep(1)


def _train_runs(uri: str, matrix: str) -> list:
    return find_runs(uri, f"tags.matrix = '{matrix}' and tags.`ctlab.kind` = 'train'")


def _steps(uri: str, run_id: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, "train_loss"))


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.postgres
def test_matrix_on_slurm_finishes_each_cell_once_with_artifacts_on_the_server(cluster, server, synthetic, tmp_path):
    base = tiny_run(synthetic, tmp_path / "runs", steps=3, log_every=1)
    path = _write(tmp_path, "slurm4", base, {"model.norm": ["layernorm", "rmsnorm"], "model.loss": ["clip", "siglip"]})
    storage = server["database"]()
    start = time.time()
    jobs = _submit(path, server["uri"], storage, 2)
    array_id = jobs[0].split("_")[0]
    assert sorted(jobs) == [f"{array_id}_0", f"{array_id}_1"]
    _wait_done(array_id, tmp_path / "slurm-logs")
    print(f"SLURM 4-cell matrix, 2 workers: {time.time() - start:.1f} s from submit to the last job's end")

    cells = {c.cell_id for c in load_matrix(path).runnable}
    runs = _train_runs(server["uri"], "slurm4")
    assert Counter(r.data.tags["cell_id"] for r in runs if r.info.status == "FINISHED") == {c: 1 for c in cells}, \
        _logs(tmp_path / "slurm-logs")
    assert len(runs) == 4
    node = subprocess.run(["sinfo", "-h", "-o", "%n"], capture_output=True, text=True).stdout.split()[0]
    for run in runs:
        assert run.data.tags["slurm.job_id"] in jobs
        assert run.data.tags["slurm.array_index"] == run.data.tags["slurm.job_id"].split("_")[1]
        assert run.data.tags["slurm.node"] == node
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    client = MlflowClient(server["uri"])
    per_label = Path(client.download_artifacts(runs[0].info.run_id, "zeroshot_per_label.csv", str(tmp_path)))
    table = pd.read_csv(per_label)
    assert sorted(set(table["pathology"])) == sorted(PATHOLOGIES) and table["auroc"].notna().sum() > 0
    assert any(server["artifacts"].rglob("zeroshot_per_label.csv"))  # stored by the server, not by the workers
    parent = find_runs(server["uri"], "tags.matrix = 'slurm4' and tags.`ctlab.kind` = 'matrix'")
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    status = _ctlab("matrix", "status", str(path), "--tracking-uri", server["uri"], "--storage", storage,
                    cwd=tmp_path)
    assert "4 done" in status.stdout, status.stdout + status.stderr


def _job_of(run) -> str:
    return run.data.tags["slurm.job_id"]


INTERRUPTIBLE_STEPS = 12  # metrics logged every step, a periodic checkpoint every 3 steps
HELD_STEP = 5  # where the gate parks a cell for the test to stop it: after the checkpoint at 3, before the one at 6


@contextmanager
def _interruptible(tmp_path: Path, name: str, server: dict, synthetic: Path,
                   held: int) -> Iterator[tuple[Path, str, str, StepGate]]:
    """A two-cell matrix submitted as two workers that log through a StepGate holding the first ``held`` cells
    inside step HELD_STEP: path, storage, array id and the gate (open until the block ends)."""
    base = tiny_run(synthetic, tmp_path / "runs", steps=INTERRUPTIBLE_STEPS, checkpoint_every=3, log_every=1)
    path = _write(tmp_path, name, base, {"model.attention": ["standard", "sdpa"]})
    storage = server["database"]()
    with StepGate(server["uri"], HELD_STEP, runs=held) as gate:
        jobs = _submit(path, gate.uri, storage, 2)
        yield path, storage, jobs[0].split("_")[0], gate


def _held_run(gate: StepGate, nth: int, uri: str, array_id: str, logs: Path, timeout: float = 300):
    """The ``nth`` run (1-based) the gate holds inside step HELD_STEP, once it is there."""
    deadline = time.time() + timeout
    while len(gate.held()) < nth:
        if time.time() > deadline:
            subprocess.run(["scancel", array_id], timeout=30)
            pytest.fail(f"no cell reached step {HELD_STEP} in {timeout:.0f} s:\n{_logs(logs)}")
        _queued(array_id)  # a requeued worker starts now, not after SLURM's requeue delay
        time.sleep(0.3)
    run = MlflowClient(uri).get_run(gate.held()[nth - 1])
    assert _steps(uri, run.info.run_id) == list(range(1, HELD_STEP))  # parked inside the step: none past it logged
    return run


def _stop_held(gate: StepGate, run, command: list[str], logs: Path) -> None:
    """Send ``command`` (scancel / scontrol requeue / a signal) to the held run's job; once its worker logs the
    request, let the step end, so the stop lands on step HELD_STEP exactly."""
    job = _job_of(run)
    subprocess.run(command, check=True, timeout=30)
    deadline = time.time() + 60
    while not re.search(rf"worker {job}: stop requested by ", _logs(logs, tail=None)):
        if time.time() > deadline:
            gate.release(run.info.run_id)
            subprocess.run(["scancel", job.split("_")[0]], timeout=30)
            pytest.fail(f"worker {job} did not receive {' '.join(command)} in 60 s:\n{_logs(logs)}")
        time.sleep(0.1)
    gate.release(run.info.run_id)


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.postgres
def test_scancel_mid_cell_resumes_it_from_its_checkpoint_step_once(cluster, server, synthetic, tmp_path):
    logs = tmp_path / "slurm-logs"
    with _interruptible(tmp_path, "slurm-cancel", server, synthetic, held=1) as (path, storage, array_id, gate):
        run = _held_run(gate, 1, server["uri"], array_id, logs)
        victim = _job_of(run)
        table = status_table(load_matrix(path), LaunchOptions(storage=storage, tracking_uri=server["uri"]))
        holder = table.set_index("cell").loc[run.data.tags["cell_id"]]
        assert (holder["state"], holder["detail"]) == ("running", f"job {victim} on {run.data.tags['slurm.node']}")
        _stop_held(gate, run, ["scancel", victim], logs)
        _wait_done(array_id, logs)
    cells = load_matrix(path).runnable
    cell = next(c for c in cells if c.cell_id == run.data.tags["cell_id"])

    text, shown = _logs(logs, tail=None), _logs(logs)
    assert re.search(rf"worker {victim} .*stopped: SIGTERM", text), shown
    resumed = [int(s) for s in re.findall(rf"resuming \S*{cell.cell_id} from step (\d+)", text)]
    assert resumed == [HELD_STEP], shown  # the step it was cancelled in, not the checkpoint at 3 nor zero
    runs = _train_runs(server["uri"], "slurm-cancel")
    assert Counter(r.data.tags["cell_id"] for r in runs if r.info.status == "FINISHED") == \
        {c.cell_id: 1 for c in cells}
    final = next(r for r in runs if r.data.tags["cell_id"] == cell.cell_id)
    assert final.info.run_id == run.info.run_id and final.info.status == "FINISHED"
    assert _steps(server["uri"], final.info.run_id) == list(range(1, INTERRUPTIBLE_STEPS + 1))  # each step once
    assert _job_of(final) != victim  # the other worker finished it
    print(f"scancel {victim}: cell {cell.cell_id} ({cell.label}) resumed from step {resumed[0]} by {_job_of(final)}")


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.postgres
def test_requeue_and_time_limit_signal_resume_cells_from_their_checkpoint(cluster, server, synthetic, tmp_path):
    logs = tmp_path / "slurm-logs"
    interrupted: dict[str, tuple[str, str]] = {}  # cell → (job, how)
    with _interruptible(tmp_path, "slurm-requeue", server, synthetic, held=2) as (path, _, array_id, gate):
        for nth, how in enumerate(("requeue", "USR2"), start=1):  # each cell as it reaches the step
            run = _held_run(gate, nth, server["uri"], array_id, logs)
            job = _job_of(run)
            _stop_held(gate, run, ["scontrol", "requeue", job] if how == "requeue" else
                       ["scancel", "--signal=USR2", job], logs)
            interrupted[run.data.tags["cell_id"]] = (job, how)
        _wait_done(array_id, logs)
    cells = {c.cell_id: c for c in load_matrix(path).runnable}
    assert set(interrupted) == set(cells)

    text, shown = _logs(logs, tail=None), _logs(logs)
    assert "stopped: time limit or preemption signal" in text and "requeued job" in text, shown
    runs = _train_runs(server["uri"], "slurm-requeue")
    assert Counter(r.data.tags["cell_id"] for r in runs if r.info.status == "FINISHED") == {c: 1 for c in cells}
    for cid, (job, how) in interrupted.items():
        resumed = [int(s) for s in re.findall(rf"resuming \S*{cid} from step (\d+)", text)]
        assert resumed == [HELD_STEP], (how, shown)
        final = next(r for r in runs if r.data.tags["cell_id"] == cid)
        assert _steps(server["uri"], final.info.run_id) == list(range(1, INTERRUPTIBLE_STEPS + 1))
        show = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
        assert "Restarts=1" in show, show  # the same job ran again
        print(f"{how} {job}: cell {cid} ({cells[cid].label}) resumed from step {resumed[0]}")


@pytest.mark.slurm
@pytest.mark.postgres
def test_bad_cluster_setups_fail_before_submitting(cluster, server, synthetic, tmp_path, monkeypatch, capsys):
    path = _write(tmp_path, "slurm-bad", tiny_run(synthetic, tmp_path / "runs", steps=2, log_every=1),
                  {"model.loss": ["clip"]})
    logs = tmp_path / "slurm-logs"
    queued_before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    good_storage = server["database"]()

    def run(*args: str) -> str:
        code = main(["matrix", "run", str(path), "--launcher", "slurm", "--workers", "2", "--slurm-logs", str(logs),
                     "--no-progress", *args])
        assert code == 2
        return capsys.readouterr().err

    err = run("--storage", f"sqlite:///{tmp_path}/optuna.db", "--tracking-uri", server["uri"])
    assert "SQLite file" in err and "--storage postgresql+psycopg://" in err
    err = run("--storage", good_storage, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db")
    assert "is a file on this machine" in err and "mlflow server --backend-store-uri" in err
    err = run("--storage", good_storage, "--tracking-uri", server["database"]())  # a database: artifacts stay local
    assert "a local path other nodes cannot read" in err and "--serve-artifacts" in err
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    err = run("--storage", good_storage, "--tracking-uri", closed)
    assert f"MLflow tracking server {closed} does not answer" in err
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    err = run("--storage", good_storage, "--tracking-uri", server["uri"])
    assert "'sbatch' is not on PATH" in err and "--launcher local" in err
    assert not logs.exists()  # nothing was submitted
    monkeypatch.undo()
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout == queued_before


@pytest.mark.slow
def test_multi_gpu_worker_trains_each_cell_under_torchrun(synthetic, tmp_path, monkeypatch):
    """A worker with G > 1 devices trains its cell as G DDP ranks (gloo on CPU here); rank 0 logs one run."""
    from core.data.dataset import CachedCTDataset
    from experiments.launcher import launch

    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    base = tiny_run(synthetic, tmp_path / "runs", steps=1, log_every=1)
    base["train"].update({"max_steps": None, "epochs": 2, "batch_size": 2})
    path = _write(tmp_path, "ddp", base, {"model.loss": ["clip"]})
    matrix = load_matrix(path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    opts = LaunchOptions(storage=f"sqlite:///{tmp_path}/optuna.db", tracking_uri=uri, progress=False,
                         nproc_per_cell=2)
    assert launch(matrix, opts) == 0
    runs = _train_runs(uri, "ddp")
    assert [r.info.status for r in runs] == ["FINISHED"]  # one run: only rank 0 logs
    volumes = len(CachedCTDataset(matrix.runnable[0].config.data, "train"))
    per_rank_steps = (volumes // 2) // 2  # each rank takes half the volumes, 2 per step
    assert _steps(uri, runs[0].info.run_id) == list(range(1, 2 * per_rank_steps + 1))  # 1 process: twice the steps
    assert "zeroshot_auroc" in runs[0].data.metrics
