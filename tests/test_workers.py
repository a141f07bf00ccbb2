"""Several worker processes on one study: PostgreSQL, a killed worker, Ctrl-C."""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from contextlib import suppress
from pathlib import Path

import optuna
import psutil
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pipeline import storage, tune
from pipeline.config import Settings
from pipeline.tracking.runs import RUN_ID_ATTR, WORKER_ATTR
from pipeline.tuning import workers
from pipeline.tuning.study import load_data
from tests.conftest import free_port, server_process, synthetic_faces, write_csv


def runs_by_trial(settings: Settings) -> dict[int, list]:
    client = MlflowClient(settings.tracking_uri)
    exp = client.get_experiment_by_name(settings.study)
    found: dict[int, list] = {}
    for run in client.search_runs([exp.experiment_id], max_results=1000):
        if "optuna.trial_number" in run.data.tags:
            found.setdefault(int(run.data.tags["optuna.trial_number"]), []).append(run)
    return found


@pytest.fixture
def postgres_url(postgres_database: str) -> str:
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{postgres_database}"


@pytest.mark.slow
def test_two_workers_on_postgresql(settings: Settings, postgres_url: str) -> None:
    pg = settings.model_copy(
        update={
            "storage": postgres_url,
            "workers": 2,
            "n_trials": 12,
            "epochs": 1,
            "sampler": "tpe",
        }
    )
    summary = tune.run(pg)
    assert summary["trials"] == 12 and summary["complete"] == 12
    study = optuna.load_study(study_name=pg.study, storage=postgres_url)
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2  # both workers did trials
    runs = runs_by_trial(pg)
    assert sorted(runs) == list(range(12))
    assert all(len(r) == 1 for r in runs.values())  # no duplicates
    statuses = Counter(r[0].info.status for r in runs.values())
    assert statuses == {"FINISHED": 12}
    parents = {r[0].data.tags["mlflow.parentRunId"] for r in runs.values()}
    assert len(parents) == 1
    parent = MlflowClient(pg.tracking_uri).get_run(parents.pop())
    assert parent.info.status == "FINISHED" and parent.data.metrics["complete"] == 12


def start_worker(settings: Settings, until: int, log: Path) -> subprocess.Popen:
    env = os.environ | workers.settings_env(settings) | {"FACEOPT_TORCH_THREADS": "1"}
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "tune-worker", "--until", str(until), "--quiet"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


@pytest.mark.slow
def test_killed_worker_trial_is_failed_and_retried(tmp_path: Path, settings: Settings) -> None:
    """SIGKILL one of two workers mid-trial on the default SQLite store."""
    slow = settings.model_copy(
        update={
            "data": write_csv(synthetic_faces(3000), tmp_path / "big.csv"),
            "epochs": 4,
            "heartbeat_interval": 1,
            "grace_period": 3,
            "study": "kill",
        }
    )
    load_data(slow)  # decode once, so both workers start from the cache together
    a = start_worker(slow, 8, tmp_path / "a.log")
    b = start_worker(slow, 8, tmp_path / "b.log")
    storage_url = slow.storage

    def running_of(pid: int) -> list[optuna.trial.FrozenTrial]:
        try:
            study = optuna.load_study(study_name="kill", storage=storage_url)
        except KeyError:
            return []
        return [
            t
            for t in study.get_trials(states=[optuna.trial.TrialState.RUNNING])
            if t.user_attrs.get("worker", "").endswith(f":{pid}")
        ]

    wait_for(lambda: running_of(a.pid), 120, "worker A to start a trial")
    time.sleep(0.5)
    (victim,) = running_of(a.pid)
    a.send_signal(signal.SIGKILL)
    a.wait()
    assert b.wait(timeout=300) == 0, (tmp_path / "b.log").read_text()[-3000:]

    study = optuna.load_study(study_name="kill", storage=storage_url)
    states = Counter(t.state for t in study.trials)
    assert states[optuna.trial.TrialState.COMPLETE] >= 8
    assert study.trials[victim.number].state == optuna.trial.TrialState.FAIL
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].state == optuna.trial.TrialState.COMPLETE
    assert retries[0].params == victim.params

    runs = runs_by_trial(slow)
    (killed_run,) = runs[victim.number]
    assert killed_run.info.status == "FAILED" and killed_run.data.tags["state"] == "FAIL"
    assert "heartbeat" in killed_run.data.tags["error"]
    assert runs[retries[0].number][0].data.tags["optuna.retry_of"] == str(victim.number)
    assert not [r for rs in runs.values() for r in rs if r.info.status == "RUNNING"]


@pytest.mark.slow
def test_ctrl_c_closes_the_trial_and_the_next_run_resumes(
    tmp_path: Path, settings: Settings
) -> None:
    slow = settings.model_copy(
        update={
            "data": write_csv(synthetic_faces(3000), tmp_path / "big.csv"),
            "epochs": 6,
            "study": "interrupt",
            "n_trials": 3,
        }
    )
    load_data(slow)
    env = os.environ | workers.settings_env(slow)
    # The `faceopt` script users run, not `python -m`: under -m, CPython 3.11 exits by SIGINT
    # (-2), whatever main returns, once a Ctrl-C landed inside an exec() of a string and was
    # handled above it, as when dataclasses build methods while torch imports lazily.
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "faceopt"), "tune"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def a_trial_runs() -> bool:
        try:
            study = optuna.load_study(study_name="interrupt", storage=slow.storage)
        except KeyError:
            return False
        running = study.get_trials(states=[optuna.trial.TrialState.RUNNING])
        return any(t.user_attrs.get(RUN_ID_ATTR) for t in running)  # its MLflow run is made

    wait_for(a_trial_runs, 120, "a running trial")
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert "run the same command to resume" in out

    study = optuna.load_study(study_name="interrupt", storage=slow.storage)
    interrupted = study.trials[-1]
    assert interrupted.state == optuna.trial.TrialState.FAIL
    (run,) = runs_by_trial(slow)[interrupted.number]
    assert run.info.status == "KILLED" and run.data.tags["state"] == "FAIL"
    client = MlflowClient(slow.tracking_uri)
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "KILLED"

    before = len(study.trials)
    tune.run(slow.model_copy(update={"n_trials": 1}))  # same epochs: others are refused
    assert len(optuna.load_study(study_name="interrupt", storage=slow.storage).trials) == before + 1


def session_of(sid: int) -> list[psutil.Process]:
    """The processes still alive in session `sid` (server_process starts each in its own)."""
    found = []
    for process in psutil.process_iter():
        with suppress(psutil.Error, ProcessLookupError):
            if os.getsid(process.pid) == sid and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
    return found


@pytest.mark.slow
def test_mlflow_server_on_postgresql(postgres_database: str, tmp_path: Path) -> None:
    """`faceopt mlflow-server` (backend from FACEOPT_MLFLOW_BACKEND) as a real process on the
    local PostgreSQL: a client on another process creates, logs and reads a run through it."""
    backend = f"postgresql+psycopg://postgres@127.0.0.1:5432/{postgres_database}"
    port = free_port()
    env = os.environ | {"FACEOPT_MLFLOW_BACKEND": backend}
    cmd = [sys.executable, "-m", "pipeline.cli", "mlflow-server", "--port", str(port)]
    cmd += ["--artifacts", str(tmp_path / "artifacts")]
    url = f"http://127.0.0.1:{port}"
    with server_process(cmd, f"{url}/health", env, tmp_path / "mlflow.log") as proc:
        client = MlflowClient(url)
        run = client.create_run(client.create_experiment("shared"))
        client.log_metric(run.info.run_id, "val_mean_acc", 0.8)
        assert client.get_run(run.info.run_id).data.metrics == {"val_mean_acc": 0.8}
        # A service manager stops the pid it started: nothing of the server may outlive it.
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        wait_for(lambda: not session_of(proc.pid), 30, "the server's processes to stop")
    assert "postgres@127.0.0.1" in (tmp_path / "mlflow.log").read_text()  # the backend it used


@pytest.mark.slow
def test_mlflow_tells_the_truth_after_a_killed_tune(tmp_path: Path, settings: Settings) -> None:
    """SIGKILL a real `faceopt tune` mid-trial; the next `tune` closes its parent run as KILLED
    and its trial's run as FAILED (Optuna fails the trial: no heartbeat), and leaves none RUNNING."""
    slow = settings.model_copy(
        update={
            "data": write_csv(synthetic_faces(3000), tmp_path / "big.csv"),
            "epochs": 4,
            "n_trials": 50,
            "heartbeat_interval": 1,
            "grace_period": 3,
            "study": "killed-tune",
        }
    )
    load_data(slow)
    env = os.environ | workers.settings_env(slow) | {"FACEOPT_TORCH_THREADS": "1"}
    with open(tmp_path / "tune.log", "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "tune"], env=env, stdout=out, stderr=out
        )

    def trials(state: optuna.trial.TrialState) -> list:
        try:
            study = optuna.load_study(study_name=slow.study, storage=slow.storage)
        except KeyError:
            return []
        return study.get_trials(states=[state])

    complete, running = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING

    def training() -> list:  # running, with its MLflow run made (and Optuna's first heartbeat)
        return [t for t in trials(running) if t.user_attrs.get(RUN_ID_ATTR)]

    # Killed before its first heartbeat, a trial would stay RUNNING in Optuna for good (stale
    # trials are found by their heartbeats), with no MLflow run to judge: not this test's case.
    wait_for(lambda: trials(complete) and training(), 240, "a complete and a training trial")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (victim,) = trials(running)
    time.sleep(4)  # past the grace period: the dead invocation's heartbeats have stopped

    tune.run(slow.model_copy(update={"n_trials": 1}))

    client = MlflowClient(slow.tracking_uri)
    exp = client.get_experiment_by_name(slow.study).experiment_id
    every = client.search_runs([exp], max_results=1000)
    assert not [r.info.run_name for r in every if r.info.status == "RUNNING"]
    parents = sorted(
        (r for r in every if "mlflow.parentRunId" not in r.data.tags),
        key=lambda r: r.info.start_time,
    )
    killed, resumed = parents
    assert killed.info.status == "KILLED" and resumed.info.status == "FINISHED"
    assert killed.info.end_time == int(killed.data.tags["faceopt.heartbeat"]) * 1000
    (victim_run,) = runs_by_trial(slow)[victim.number]
    assert victim_run.info.status == "FAILED" and victim_run.data.tags["state"] == "FAIL"


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_a_trial_whose_worker_died_while_it_was_sampled_is_failed_and_retried(
    tmp_path: Path,
) -> None:
    """ask() makes a trial RUNNING before its heartbeat starts; a worker killed then leaves a
    trial that Optuna's stale check never fails (so a run waiting for it would never end).
    fail_orphans fails it once old enough and queues its retry; a trial whose objective started
    (runs.WORKER_ATTR) is left to the heartbeats, and so is a young one."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    store = storage.open_storage(url, 1, 1, storage.retry_stale(max_retry=2))
    study = optuna.create_study(study_name="s", storage=store, direction="maximize")
    orphan = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})  # then the kill
    alive = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    alive.set_user_attr(WORKER_ATTR, "host:1")
    young = study.ask()
    time.sleep(2.5)  # past the grace period: Optuna's own check still fails nothing
    optuna.storages.fail_stale_trials(study)
    assert {t.number: t.state for t in study.trials}[orphan.number] == TrialState.RUNNING

    started = {t.number: t.datetime_start for t in study.trials}
    age = (datetime.datetime.now() - started[young.number]).total_seconds()
    assert workers.fail_orphans(study, older_than=age + 60) == []
    assert workers.fail_orphans(study, older_than=1) == [orphan.number, young.number]
    states = {t.number: t.state for t in study.trials}
    assert states[orphan.number] == TrialState.FAIL and states[alive.number] == TrialState.RUNNING
    retried = [t for t in study.trials if t.state == TrialState.WAITING]
    assert [t.params for t in retried] == [{"x": orphan.params["x"]}, {}]
    assert workers.fail_orphans(study, older_than=1) == []  # nothing twice
