"""Several worker processes on one study: PostgreSQL, a killed worker, Ctrl-C."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import optuna
import psutil
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pipeline import storage, tune
from pipeline.config import Settings
from pipeline.storage import Owner
from pipeline.tracking import runs as tracking
from pipeline.tracking.runs import RUN_ID_ATTR, WORKER_ATTR
from pipeline.tuning import workers
from pipeline.tuning.study import load_data
from tests.conftest import free_port, server_process, synthetic_faces, write_csv

# One unit of work for pytest-xdist, scheduled (as the largest) beside tests/test_bench.py: their
# processes run while the other pytest-xdist process trains the session's registered model,
# instead of both waiting for it. They need no trained model.
pytestmark = pytest.mark.xdist_group("workers")


def victim_owner(trial: optuna.trial.FrozenTrial) -> Owner:
    owner = storage.trial_owner(trial)
    assert owner is not None, trial.system_attrs
    return owner


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
            "n_trials": 6,
            "epochs": 1,
            "sampler": "tpe",
        }
    )
    summary = tune.run(pg)
    assert summary.trials == 6 and summary.complete == 6
    study = optuna.load_study(study_name=pg.study, storage=postgres_url)
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2  # both workers did trials
    runs = runs_by_trial(pg)
    assert sorted(runs) == list(range(6))
    assert all(len(r) == 1 for r in runs.values())  # no duplicates
    statuses = Counter(r[0].info.status for r in runs.values())
    assert statuses == {"FINISHED": 6}
    parents = {r[0].data.tags["mlflow.parentRunId"] for r in runs.values()}
    assert len(parents) == 1
    parent = MlflowClient(pg.tracking_uri).get_run(parents.pop())
    assert parent.info.status == "FINISHED" and parent.data.metrics["complete"] == 6


def start_worker(settings: Settings, until: int, log: Path) -> subprocess.Popen:
    env = os.environ | workers.settings_env(settings) | {"FACEOPT_TORCH_THREADS": "1"}
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "tune-worker", "--until", str(until), "--quiet"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def watch(name: str, url: str) -> Callable[[], optuna.Study | None]:
    """The study as it is now (None until a worker has made it), read through one storage:
    opening one from its URL at every poll took a sixth of a second of the CPU that the workers
    under test need."""
    store = optuna.storages.RDBStorage(url)

    def study() -> optuna.Study | None:
        try:
            return optuna.load_study(study_name=name, storage=store)
        except KeyError:
            return None

    return study


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
            "data": write_csv(synthetic_faces(2000), tmp_path / "big.csv"),
            "epochs": 4,
            "heartbeat_interval": 1,
            "grace_period": 3,
            "study": "kill",
        }
    )
    load_data(slow)  # decode once, so both workers start from the cache together
    a = start_worker(slow, 4, tmp_path / "a.log")
    b = start_worker(slow, 4, tmp_path / "b.log")
    study = watch("kill", slow.storage)

    training: list[optuna.trial.FrozenTrial] = []

    def a_trains() -> bool:
        """Worker A's trial, sampled (its seed is set once its params are) and with two epochs or
        more to go: killed as soon as seen, it cannot have finished meanwhile."""
        now = study()
        training[:] = [
            t
            for t in (now.get_trials(states=[TrialState.RUNNING]) if now else [])
            if t.user_attrs.get("worker", "").endswith(f":{a.pid}")
            and "seed" in t.user_attrs
            and len(t.intermediate_values) < slow.epochs - 1
        ]
        return bool(training)

    wait_for(a_trains, 120, "worker A to start a trial")
    a.send_signal(signal.SIGKILL)
    (victim,) = training
    a.wait()
    assert b.wait(timeout=300) == 0, (tmp_path / "b.log").read_text()[-3000:]

    trials = study().trials
    states = Counter(t.state for t in trials)
    assert states[TrialState.COMPLETE] >= 3
    assert trials[victim.number].state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == victim.params

    runs = runs_by_trial(slow)
    (killed_run,) = runs[victim.number]
    assert killed_run.info.status == "FAILED" and killed_run.data.tags["state"] == "FAIL"
    # Found by its owner record (this machine, pid gone), not by waiting for its heartbeat.
    assert (
        killed_run.data.tags["error"]
        == f"its worker process {victim_owner(victim)} is gone (killed?)"
    )
    assert runs[retries[0].number][0].data.tags["optuna.retry_of"] == str(victim.number)
    assert not [r for rs in runs.values() for r in rs if r.info.status == "RUNNING"]


@pytest.mark.slow
def test_ctrl_c_closes_the_trial_and_the_next_run_resumes(
    tmp_path: Path, settings: Settings
) -> None:
    slow = settings.model_copy(
        update={
            "data": write_csv(synthetic_faces(2000), tmp_path / "big.csv"),
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

    study = watch("interrupt", slow.storage)

    def mid_training() -> bool:  # its MLflow run made, epochs done and several still to go
        now = study()
        running = now.get_trials(states=[TrialState.RUNNING]) if now else []
        return any(
            t.user_attrs.get(RUN_ID_ATTR) and 0 < len(t.intermediate_values) < slow.epochs - 2
            for t in running
        )

    wait_for(mid_training, 120, "a trial in training")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert "run the same command to resume" in out

    trials = study().trials
    interrupted = trials[-1]
    assert interrupted.state == TrialState.FAIL
    (run,) = runs_by_trial(slow)[interrupted.number]
    assert run.info.status == "KILLED" and run.data.tags["state"] == "FAIL"
    client = MlflowClient(slow.tracking_uri)
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "KILLED"

    tune.run(slow.model_copy(update={"n_trials": 1}))  # same epochs: others are refused
    assert len(study().trials) == len(trials) + 1


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
    # Two workers: a supervisor with children, whose stop the test checks, at half the start-up.
    cmd += ["--artifacts", str(tmp_path / "artifacts"), "--workers", "2"]
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
def test_a_killed_tune_is_closed_at_once_by_the_next(tmp_path: Path, settings: Settings) -> None:
    """SIGKILL a real `faceopt tune` (its whole process group) mid-trial, then run `tune` again at
    once. With a grace period of ten minutes only the owner records (this machine, a pid that is
    gone) can tell that the killed invocation is dead: the resumed run fails and retries its
    trial, closes its runs, keeps every finished trial, and leaves nothing RUNNING."""
    epochs = 8
    slow = settings.model_copy(
        update={
            "data": write_csv(synthetic_faces(2000), tmp_path / "big.csv"),
            "epochs": epochs,
            "n_trials": 200,
            "grace_period": 600,
            "study": "killed-tune",
        }
    )
    load_data(slow)  # decoded once, here
    env = os.environ | workers.settings_env(slow) | {"FACEOPT_TORCH_THREADS": "1"}
    with open(tmp_path / "tune.log", "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "tune"],
            env=env,
            stdout=out,
            stderr=out,
            start_new_session=True,  # its own process group, as a terminal's job
        )

    study = watch(slow.study, slow.storage)

    def mid_trial() -> bool:  # a trial done, one training with epochs still to go
        found = study()
        if found is None:
            return False
        trials = found.get_trials(deepcopy=False)
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        running = [t for t in trials if t.state == TrialState.RUNNING]
        return len(done) >= 1 and any(
            t.user_attrs.get(RUN_ID_ATTR) and 0 < len(t.intermediate_values) < epochs - 2
            for t in running
        )

    wait_for(mid_trial, 240, "a complete trial and one mid-training")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = study().get_trials()
    (victim,) = [t for t in before if t.state == TrialState.RUNNING]
    finished = {t.number: (t.state, t.values) for t in before if t.state.is_finished()}
    assert victim_owner(victim).pid == proc.pid

    # `make tune N_TRIALS=2` at once, as a user would: its own process, one torch thread.
    started = time.monotonic()
    resumed = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "tune"],
        env=env | {"FACEOPT_N_TRIALS": "2"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert time.monotonic() - started < slow.grace_period  # no waiting for the grace period

    after = study().get_trials()
    assert not [t.number for t in after if t.state == TrialState.RUNNING]
    assert {t.number: (t.state, t.values) for t in after if t.number in finished} == finished
    assert after[victim.number].state == TrialState.FAIL
    retries = [t for t in after if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == victim.params

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
    assert (
        killed.data.tags["faceopt.closed_by"]
        == f"reconcile: its process {victim_owner(victim)} is gone"
    )
    assert killed.info.end_time == int(killed.data.tags["faceopt.heartbeat"]) * 1000
    (victim_run,) = runs_by_trial(slow)[victim.number]
    assert victim_run.info.status == "FAILED" and victim_run.data.tags["state"] == "FAIL"
    assert victim_run.data.tags["faceopt.pid"] == str(proc.pid)
    assert "is gone" in victim_run.data.tags["error"]


def set_owner(study: optuna.Study, trial: optuna.Trial, owner: Owner) -> None:
    study._storage.set_trial_system_attr(trial._trial_id, storage.OWNER_ATTR, owner.record())


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_a_trial_whose_worker_died_is_failed_by_its_owner_record_or_its_age(
    tmp_path: Path,
) -> None:
    """Each trial records its owner process as it is created, before it is sampled. A trial whose
    owner is gone from this machine is failed at the next stale check (as a trial starts),
    heartbeat or none, whatever the grace period; one whose owner runs here is left, however old
    its heartbeat. A trial owned on another machine keeps the heartbeat rule, and one that never
    reached its objective there (no heartbeat yet) is failed once older than orphan_after (ten
    grace periods). Each failed trial is queued again, once."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    store = storage.open_storage(url, 1, 1, storage.retry_stale(max_retry=2))
    study = optuna.create_study(study_name="s", storage=store, direction="maximize")
    x = {"x": optuna.distributions.FloatDistribution(0, 1)}
    me = Owner.current()
    elsewhere = dataclasses.replace(me, machine="another-host")
    gone, mine, beating, sampled = (study.ask(x) for _ in range(4))
    assert storage.trial_owner(study.trials[mine.number]) == me  # recorded by the storage
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    set_owner(study, gone, dataclasses.replace(me, pid=dead.pid))
    set_owner(study, beating, elsewhere)
    set_owner(study, sampled, elsewhere)
    for trial in (mine, beating):  # their objectives started: heartbeats
        trial.set_user_attr(WORKER_ATTR, "host:1")
        store.record_heartbeat(trial._trial_id)
    time.sleep(2.5)  # past the grace period

    optuna.storages.fail_stale_trials(study)  # what Optuna runs as a trial starts
    states = {t.number: t.state for t in study.trials}
    assert states[gone.number] == states[beating.number] == TrialState.FAIL
    assert states[mine.number] == states[sampled.number] == TrialState.RUNNING

    store.orphan_after = 1  # ten grace periods, here a second
    assert storage.fail_dead_trials(study) == [sampled.number]
    assert storage.fail_dead_trials(study) == []  # nothing twice
    assert {t.number: t.state for t in study.trials}[mine.number] == TrialState.RUNNING
    retried = [t for t in study.trials if t.state == TrialState.WAITING]
    assert [t.system_attrs["failed_trial"] for t in retried] == [
        gone.number,
        beating.number,
        sampled.number,
    ]
    assert [t.params for t in retried] == [{"x": t.params["x"]} for t in (gone, beating, sampled)]
    # Taken from the queue, a retry is owned by whoever takes it.
    taken = study.ask()
    assert storage.trial_owner(study.trials[taken.number]) == me


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_a_stage_closes_at_its_end_what_died_while_it_ran(settings: Settings) -> None:
    """stage_run reconciles when it ends as well as when it starts: a trial and a run whose
    process died while the stage ran are closed before the stage's process exits."""
    study = optuna.create_study(
        study_name=settings.study,
        storage=storage.open_storage(settings.storage, 10, 600),
        direction="maximize",
    )
    me = Owner.current()
    dead = dataclasses.replace(me, started=me.started - 3600)  # this pid, another process
    liveness = tracking.Liveness(heartbeat_interval=10, grace_period=600, max_retry=2)
    with tracking.stage_run(
        settings.tracking_uri,
        settings.study,
        None,
        {"faceopt.report": "1"},
        study=study,
        liveness=liveness,
        artifact_root=settings.artifact_root,
    ) as stage:
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        set_owner(study, trial, dead)
        other = tracking.start_parent(
            stage.client, stage.experiment_id, settings.study, tracking.owner_tags(dead)
        )
        assert stage.client.get_run(other).info.status == "RUNNING"
    client = stage.client
    assert client.get_run(other).info.status == "KILLED"
    assert client.get_run(stage.run_id).info.status == "FINISHED"
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL, TrialState.WAITING]  # failed and queued again
    tags = client.get_run(stage.run_id).data.tags
    assert tags["faceopt.pid"] == str(os.getpid()) and tags["optuna.study"] == settings.study


def test_a_ctrl_c_before_the_objective_leaves_no_trial_running(settings: Settings) -> None:
    """Ctrl-C after ask() made a trial and before its objective started (here while the sampler
    prepares it): Optuna never sees that trial, which would stay RUNNING until a later run found
    this process gone. The stage fails it as it ends, without queueing it again."""

    class InterruptedSampler(optuna.samplers.RandomSampler):
        def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            if trial.number == 1:
                raise KeyboardInterrupt

    study = optuna.create_study(
        study_name=settings.study,
        storage=storage.open_storage(settings.storage, 10, 600),
        sampler=InterruptedSampler(seed=0),
        direction="maximize",
    )
    stage_run = tracking.stage_run(
        settings.tracking_uri,
        settings.study,
        None,
        {},
        study=study,
        artifact_root=settings.artifact_root,
    )
    with pytest.raises(KeyboardInterrupt), stage_run as stage:
        study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=3)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL]
    assert storage.trial_owner(study.trials[1]) == Owner.current()
    assert stage.client.get_run(stage.run_id).info.status == "KILLED"
