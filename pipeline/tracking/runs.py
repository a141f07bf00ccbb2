"""MLflow logging through MlflowClient by run id: a parent run per invocation, a child run per trial.

No fluent API (mlflow.start_run) for logging: it keeps one "active run" per thread, which breaks
with n_jobs > 1 and when several processes share a study. Run ids passed explicitly work everywhere.
The one exception is model logging, which has no client form (registry/package.py)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import optuna
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from pipeline.storage import enable_wal
from pipeline.tracking import report

log = logging.getLogger(__name__)

RUN_ID_ATTR = "mlflow_run_id"
# Set first thing when a trial's objective starts (Optuna's heartbeat is running by then).
WORKER_ATTR = "worker"
# Seconds since the epoch, stamped on a live invocation's parent run: a parent whose stamp stopped
# belongs to a process that is gone (SIGKILL, power loss), on whichever host it ran.
HEARTBEAT_TAG = "faceopt.heartbeat"
# What kind of experiment this is, for MLflow UIs that choose their view by it (3.17's does not:
# it follows its "workflowType", which `faceopt ui`'s link sets to machine_learning).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
STATUS = {
    optuna.trial.TrialState.COMPLETE: "FINISHED",
    optuna.trial.TrialState.PRUNED: "FINISHED",  # a pruned trial ran as intended; its tag says so
    optuna.trial.TrialState.FAIL: "FAILED",
}


def client_for(tracking_uri: str) -> MlflowClient:
    enable_wal(tracking_uri)  # a local SQLite store is shared by every worker process
    return MlflowClient(tracking_uri=tracking_uri)


def ensure_experiment(client: MlflowClient, name: str, artifact_root: Path) -> str:
    """The experiment's id, creating it (artifacts under artifact_root for a local store)."""
    found = client.get_experiment_by_name(name)
    if found:
        if found.tags.get("mlflow.experimentKind") is None:  # made by an older faceopt
            for key, value in EXPERIMENT_KIND.items():
                client.set_experiment_tag(found.experiment_id, key, value)
        return found.experiment_id
    # A tracking server decides where artifacts go; a local database store needs to be told.
    local = not client.tracking_uri.startswith(("http://", "https://", "databricks"))
    location = (Path(artifact_root) / name).resolve().as_uri() if local else None
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    except MlflowException:  # another worker created it a moment ago
        return client.get_experiment_by_name(name).experiment_id


def start_parent(client: MlflowClient, experiment_id: str, study: str, tags: dict) -> str:
    name = f"{study}-{time.strftime('%Y%m%d-%H%M%S')}"
    tags = {
        "optuna.study": study,
        "faceopt.worker": f"{socket.gethostname()}:{os.getpid()}",
        HEARTBEAT_TAG: str(int(time.time())),
        **tags,
    }
    return client.create_run(experiment_id, run_name=name, tags=tags).info.run_id


@contextlib.contextmanager
def heartbeat(client: MlflowClient, run_id: str, interval: float) -> Iterator[None]:
    """Stamp the run with the time every `interval` seconds while the block runs."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            try:
                client.set_tag(run_id, HEARTBEAT_TAG, str(int(time.time())))
            except Exception as error:  # a busy store must not end the run; the next beat retries
                log.warning("could not stamp run %s's heartbeat: %s", run_id, error)

    thread = threading.Thread(target=beat, name="mlflow-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def reconcile(
    client: MlflowClient,
    experiment_id: str,
    study: optuna.Study,
    heartbeat_interval: float,
    grace_period: float,
) -> int:
    """Close the runs that dead invocations of this study left RUNNING; how many were closed.

    A trial's run takes its trial's final state (a process killed between Optuna's tell and the
    run's close leaves a COMPLETE trial behind a RUNNING run); a run whose trial is still RUNNING
    is left to Optuna's heartbeats, which fail the trial (and close the run) once its worker is
    gone. Any other run (a tuning invocation's, train-best's, report's) whose heartbeat is older
    than the grace period and three beats is closed as KILLED, ended at its last heartbeat; one
    without a heartbeat tag (an older faceopt's) cannot be judged and is left as it is.
    """
    stale_after = max(grace_period, 3 * heartbeat_interval)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    closed = 0
    now = time.time()
    for run in _running(client, experiment_id):
        tags = run.data.tags
        if tags.get("optuna.study") != study.study_name:
            continue
        number = tags.get("optuna.trial_number")
        if number is not None:
            trial = trials.get(int(number))
            if trial is None or not trial.state.is_finished():
                continue
            end = trial.datetime_complete.timestamp() if trial.datetime_complete else now
            close_trial_run(client, run.info.run_id, trial, end_time=end)
        else:
            if HEARTBEAT_TAG not in tags:
                continue
            last = float(tags[HEARTBEAT_TAG])
            if now - last <= stale_after:
                continue
            client.set_tag(run.info.run_id, "faceopt.closed_by", "reconcile: no heartbeat")
            client.set_terminated(run.info.run_id, status="KILLED", end_time=int(last * 1000))
        closed += 1
    if closed:
        log.warning("closed %d MLflow runs that a killed invocation left RUNNING", closed)
    return closed


def _running(client: MlflowClient, experiment_id: str) -> Iterator:
    token = None
    while True:
        page = client.search_runs(
            [experiment_id], "attributes.status = 'RUNNING'", max_results=500, page_token=token
        )
        yield from page
        token = page.token
        if not token:
            return


def close_trial_run(
    client: MlflowClient,
    run_id: str,
    trial: optuna.trial.FrozenTrial,
    end_time: float | None = None,
) -> None:
    """A finished trial's run: its state as a tag, objective and duration, and its MLflow status."""
    metrics = {}
    if trial.duration is not None:
        metrics["duration_s"] = trial.duration.total_seconds()
    if trial.value is not None:
        metrics["objective"] = trial.value
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
        tags=[RunTag("state", trial.state.name)],
    )
    status = STATUS.get(trial.state, "KILLED")
    client.set_terminated(
        run_id, status=status, end_time=None if end_time is None else int(end_time * 1000)
    )


def log_params(client: MlflowClient, run_id: str, params: dict) -> None:
    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])


def log_metrics(client: MlflowClient, run_id: str, metrics: dict, step: int = 0) -> None:
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def log_dataset(
    client: MlflowClient, run_id: str, source: str, digest: str, profile: dict, context: str
) -> None:
    """The data as an MLflow dataset input (name, digest, source, split sizes), so the UI's
    dataset column links the runs that used the same data."""
    dataset = Dataset(
        name=Path(source).name,
        digest=digest[:16],  # the file's sha256, shortened as MLflow shows digests
        source_type="local",
        source=json.dumps({"uri": str(Path(source).resolve())}),
        schema=json.dumps(
            {"images": "uint8 (N, 48, 48) grayscale", "labels": ["age", "ethnicity", "gender"]}
        ),
        profile=json.dumps(profile),
    )
    tags = [InputTag("mlflow.data.context", context)]
    client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=tags)])


def log_json(client: MlflowClient, run_id: str, obj: dict, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(obj, indent=2, default=str))
        client.log_artifact(run_id, str(path))


@contextlib.contextmanager
def ended(client: MlflowClient, run_id: str) -> Iterator[str]:
    """The run, ended however the block ends: FINISHED, KILLED on Ctrl-C, FAILED on an error."""
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        client.set_terminated(run_id, status=status)


@contextlib.contextmanager
def system_metrics(tracking_uri: str, run_id: str, interval: float) -> Iterator[None]:
    """MLflow's own system metrics on the run (`system/...`) while the block runs."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, tracking_uri=tracking_uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
        # MLflow's monitor logs a sample only after a full interval: a shorter run would have
        # none. Log what it collected, so every run has at least one point.
        recorded = client_for(tracking_uri).get_run(run_id).data.metrics
        if not any(key.startswith("system/") for key in recorded):
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()


@contextlib.contextmanager
def parent_run(
    client: MlflowClient,
    run_id: str,
    study: optuna.Study,
    metric: str,
    heartbeat_interval: float,
    plots: Callable[[], bool] = lambda: True,
) -> Iterator[str]:
    """The parent run of one invocation, stamped with heartbeats while it lives and ended as
    `ended` ends runs, after the study's summary and (if `plots()`) its plots are logged on it."""
    with ended(client, run_id), heartbeat(client, run_id, heartbeat_interval):
        try:
            yield run_id
        finally:
            log_summary(client, run_id, study, metric, plots=plots())


def log_summary(
    client: MlflowClient, run_id: str, study: optuna.Study, metric: str, plots: bool = True
) -> None:
    """The study's counts and best value as metrics, its summary as JSON, and its plots."""
    summary = report.summary(study)
    numbers = {k: summary[k] for k in ("trials", "complete", "pruned", "fail")}
    if "best_value" in summary and math.isfinite(summary["best_value"]):
        numbers["best_value"] = summary["best_value"]
    log_metrics(client, run_id, numbers)
    log_json(client, run_id, summary, "summary.json")
    if plots:
        log_plots(client, run_id, study, metric)


def log_plots(client, run_id: str, study: optuna.Study, metric: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for path in report.write_plots(study, Path(tmp), f"val {metric} accuracy"):
            client.log_artifact(run_id, str(path), artifact_path="plots")


class TrialLogger:
    """Opens a child run when a trial starts, logs its epochs, and closes it as an Optuna callback."""

    def __init__(self, client: MlflowClient, experiment_id: str, parent_run_id: str, tags: dict):
        self.client = client
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.tags = tags
        # Epoch metrics are written by one thread of ours so training never waits on the store;
        # a run's pending writes are awaited before it is closed. (MLflow's own asynchronous
        # logging costs a second at every run's end: its queue polls with a one-second timeout.)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-epochs")
        self._pending: dict[str, list[Future]] = {}
        # What this process's trials came to, so an invocation whose every trial failed says so.
        self.states: Counter[optuna.trial.TrialState] = Counter()
        self.first_error: str | None = None

    def start(self, trial: optuna.Trial) -> str:
        worker = f"{socket.gethostname()}:{os.getpid()}"
        # Before MLflow is asked anything: a trial with this attr reached its objective (and
        # Optuna's heartbeat), so workers.fail_orphans never fails it, however slow MLflow is.
        trial.set_user_attr(WORKER_ATTR, worker)
        tags = {
            MLFLOW_PARENT_RUN_ID: self.parent_run_id,
            MLFLOW_RUN_NAME: f"trial-{trial.number}",
            "optuna.study": trial.study.study_name,
            "optuna.trial_number": str(trial.number),
            "faceopt.worker": worker,
            "state": "RUNNING",
            **self.tags,
        }
        retry_of = trial.study._storage.get_trial_system_attrs(trial._trial_id).get("failed_trial")
        if retry_of is not None:
            tags["optuna.retry_of"] = str(retry_of)
        run_id = self.client.create_run(self.experiment_id, tags=tags).info.run_id
        trial.set_user_attr(RUN_ID_ATTR, run_id)
        self._log_async(run_id, {"trial_number": trial.number}, step=0)
        return run_id

    def log_params(self, run_id: str, params: dict) -> None:
        log_params(self.client, run_id, params)

    def log_epoch(self, run_id: str, epoch: int, metrics: dict[str, float]) -> None:
        self._log_async(run_id, metrics, step=epoch)

    def _log_async(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        future = self._writer.submit(self.client.log_batch, run_id, metrics=batch)
        self._pending.setdefault(run_id, []).append(future)

    def _close(self, run_id: str, tags: dict, status: str) -> None:
        for future in self._pending.pop(run_id, []):
            future.result()
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        if status:
            self.client.set_terminated(run_id, status=status)

    def fail(self, run_id: str, error: BaseException, status: str = "FAILED") -> None:
        """Record why a trial failed; for interrupts also close the run (no callback will)."""
        if self.first_error is None:
            self.first_error = f"{type(error).__name__}: {error} (traceback on MLflow run {run_id})"
        tags = {
            "error": f"{type(error).__name__}: {error}"[:5000],
            "traceback": "".join(traceback.format_exception(error))[-5000:],
        }
        if status != "FAILED":
            tags["state"] = "FAIL"
        self._close(run_id, tags, status if status != "FAILED" else "")

    def stale(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """A trial whose worker died (no heartbeat): close its run as FAILED, never RUNNING."""
        # A worker killed between creating the run and recording its id left only the run's tags.
        run_id = trial.user_attrs.get(RUN_ID_ATTR) or self._running_run_of(study, trial.number)
        if run_id is not None:
            tags = {"error": "its worker stopped sending heartbeats (killed?)", "state": "FAIL"}
            self._close(run_id, tags, "FAILED")

    def _running_run_of(self, study: optuna.Study, number: int) -> str | None:
        wanted = {"optuna.study": study.study_name, "optuna.trial_number": str(number)}
        for run in _running(self.client, self.experiment_id):
            if wanted.items() <= run.data.tags.items():
                return run.info.run_id
        return None

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.states[trial.state] += 1
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if run_id is None:  # the trial failed before its run was created
            return
        for future in self._pending.pop(run_id, []):
            future.result()
        close_trial_run(self.client, run_id, trial)
