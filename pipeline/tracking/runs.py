"""MLflow logging through MlflowClient by run id: a parent run per invocation, a child run per trial.

No fluent API (mlflow.start_run) for logging: it keeps one "active run" per thread, which breaks
with n_jobs > 1 and when several processes share a study. Run ids passed explicitly work everywhere.
The one exception is model logging, which has no client form (registry/package.py).

Every stage (tune, tune-worker, report, train-best) opens its run through stage_run, which records
the process that owns it, keeps its heartbeat, ends it, and reconciles the study's leftovers
(what dead invocations left RUNNING) when the stage starts, when each trial starts and when it
ends: the rules of who is dead live in reconcile and pipeline.storage.why_dead."""

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
from dataclasses import asdict, dataclass
from pathlib import Path

import optuna
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from pipeline import storage
from pipeline.storage import Owner, enable_wal
from pipeline.tracking import report

log = logging.getLogger(__name__)

RUN_ID_ATTR = "mlflow_run_id"
# Set first thing when a trial's objective starts (Optuna's heartbeat is running by then).
WORKER_ATTR = storage.WORKER_ATTR
# Seconds since the epoch, stamped on a live invocation's parent run: a parent whose stamp stopped
# belongs to a process that is gone (SIGKILL, power loss), on whichever host it ran.
HEARTBEAT_TAG = "faceopt.heartbeat"
# The process that owns a run (storage.Owner): on its own machine, a run whose process is gone is
# closed at once, whatever the grace period.
OWNER_TAGS = {
    "host": "faceopt.host",
    "machine": "faceopt.machine",
    "pid": "faceopt.pid",
    "started": "faceopt.pid_started",
}
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


def owner_tags(owner: Owner | None = None) -> dict[str, str]:
    """The run's owner (this process unless told) as tags."""
    owner = owner or Owner.current()
    return {tag: str(getattr(owner, field)) for field, tag in OWNER_TAGS.items()}


def run_owner(tags: dict[str, str]) -> Owner | None:
    """The owner a run's tags record; None for a run of an older faceopt (or not of faceopt)."""
    return Owner.from_record({field: tags.get(tag) for field, tag in OWNER_TAGS.items()})


def start_parent(
    client: MlflowClient, experiment_id: str, study: str, tags: dict, name: str | None = None
) -> str:
    name = name or f"{study}-{time.strftime('%Y%m%d-%H%M%S')}"
    tags = {
        "optuna.study": study,
        "faceopt.worker": f"{socket.gethostname()}:{os.getpid()}",
        HEARTBEAT_TAG: str(int(time.time())),
        **owner_tags(),
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
    max_retry: int = 2,
) -> int:
    """Close what dead invocations of this study left RUNNING; how many MLflow runs were closed.

    First the study's trials (storage.fail_dead_trials): a RUNNING trial whose owner process is
    gone from this machine is failed at once, one owned on another machine once its heartbeat is
    older than the grace period, one that never reached its objective once ten grace periods
    old; each is queued again (up to max_retry times) and its run closed as FAILED. Then the
    runs: a trial's run takes its trial's final state (a process killed between Optuna's tell
    and the run's close leaves a COMPLETE trial behind a RUNNING run); a run whose trial is
    still RUNNING is left as it is. Any other run (a tuning invocation's, train-best's, report's)
    is closed as KILLED, ended at its last heartbeat, when its owner process is gone from this
    machine, or, owned on another machine (or by an older faceopt), when its heartbeat is older
    than the grace period and three beats; one with neither record cannot be judged and is left.
    """
    failed = storage.fail_dead_trials(study, stale_callback(client, max_retry, experiment_id))
    if failed:
        log.warning("failed trials %s, whose workers are gone", failed)
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
            last = float(tags[HEARTBEAT_TAG]) if HEARTBEAT_TAG in tags else None
            owner = run_owner(tags)
            dead = owner.is_dead() if owner else None
            if dead is False:  # its process is running, here
                continue
            if dead:
                why = f"reconcile: its process {owner} is gone"
            elif last is not None and now - last > stale_after:
                why = "reconcile: no heartbeat"
            else:
                continue
            end = last if last is not None else now
            client.set_tag(run.info.run_id, "faceopt.closed_by", why)
            client.set_terminated(run.info.run_id, status="KILLED", end_time=int(end * 1000))
        closed += 1
    if closed:
        log.warning("closed %d MLflow runs that a killed invocation left RUNNING", closed)
    return closed


def stale_callback(
    client: MlflowClient, max_retry: int, experiment_id: str | None = None
) -> storage.StaleCallback:
    """For a trial failed because its worker is gone: close its run as FAILED, queue it again."""

    def close(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        close_stale_trial_run(client, study, trial, experiment_id)

    return storage.retry_stale(max_retry, before=close)


def close_stale_trial_run(
    client: MlflowClient,
    study: optuna.Study,
    trial: optuna.trial.FrozenTrial,
    experiment_id: str | None = None,
) -> None:
    """A trial whose worker died: close its run (if it has one) as FAILED, never RUNNING."""
    # A worker killed between creating the run and recording its id left only the run's tags.
    run_id = trial.user_attrs.get(RUN_ID_ATTR)
    if run_id is None:
        if experiment_id is None:
            found = client.get_experiment_by_name(study.study_name)
            experiment_id = found.experiment_id if found else None
        if experiment_id is not None:
            run_id = _running_run_of(client, experiment_id, study, trial.number)
    if run_id is None:
        return
    tags = {"error": storage.death_note(trial), "state": "FAIL"}
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    client.set_terminated(run_id, status="FAILED")


def _running_run_of(
    client: MlflowClient, experiment_id: str, study: optuna.Study, number: int
) -> str | None:
    wanted = {"optuna.study": study.study_name, "optuna.trial_number": str(number)}
    for run in _running(client, experiment_id):
        if wanted.items() <= run.data.tags.items():
            return run.info.run_id
    return None


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
    try:
        client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=tags)])
    except MlflowException as e:
        # Two processes starting at once both insert the dataset; the one that lost the race
        # links its run to the row the other wrote.
        if "UNIQUE constraint" not in str(e) and "duplicate key" not in str(e):
            raise
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


_system_metrics = system_metrics  # stage_run's parameter of that name hides it there


@dataclass(frozen=True)
class Liveness:
    """When the owner of a trial or run is taken for dead (Settings' fields of the same names)."""

    heartbeat_interval: float = 10
    grace_period: float = 30
    max_retry: int = 2

    @classmethod
    def of(cls, settings) -> Liveness:
        return cls(settings.heartbeat_interval, settings.grace_period, settings.max_retry)


@dataclass(frozen=True)
class Stage:
    """What stage_run yields: where to log, and `reconcile()` for a stage to run again (as each
    trial starts)."""

    client: MlflowClient
    experiment_id: str
    run_id: str
    reconcile: Callable[[], int]


@contextlib.contextmanager
def stage_run(
    tracking: MlflowClient | str,
    experiment: str,
    name: str | None,
    tags: dict[str, str],
    *,
    study: optuna.Study,
    liveness: Liveness = Liveness(),
    artifact_root: Path = Path("mlruns"),
    run_id: str | None = None,
    parent: str | None = None,
    system_metrics: float | None = None,
    on_end: Callable[[str], None] | None = None,
) -> Iterator[Stage]:
    """The MLflow run of one stage (a tuning invocation, a worker, a report, train-best).

    Reconciles the study's leftovers (reconcile) first, then creates the run in `experiment`
    (made if missing) named `name` (else "<experiment>-<time>") with `tags`, the study's name,
    this process as its owner and a heartbeat it stamps every heartbeat_interval seconds while
    the block runs, and MLflow's system metrics every `system_metrics` seconds if given. When the
    block ends it fails the study's trials still RUNNING in this process (storage.fail_own_trials)
    and reconciles again (what died meanwhile is closed before this process exits),
    calls on_end(run_id) (a summary), and ends the run FINISHED, KILLED on Ctrl-C or FAILED on
    an error. `run_id`: log on that existing run instead (made by someone who left it to this
    stage to end). `parent`: another process's run, under which this one logs trials: nothing is
    created, stamped or ended here, only reconciled.
    """
    client = tracking if isinstance(tracking, MlflowClient) else client_for(tracking)
    existing = run_id or parent
    if existing:
        experiment_id = client.get_run(existing).info.experiment_id
    else:
        with storage.init_lock(client.tracking_uri):  # workers started together create it once
            experiment_id = ensure_experiment(client, experiment, artifact_root)

    def sweep(ending: bool = False) -> int:
        try:
            if ending and (interrupted := storage.fail_own_trials(study)):
                log.warning(
                    "failed trials %s, still RUNNING in this process as its stage ended",
                    interrupted,
                )
            return reconcile(
                client,
                experiment_id,
                study,
                liveness.heartbeat_interval,
                liveness.grace_period,
                liveness.max_retry,
            )
        except Exception as error:  # a busy store must not end the stage; the next sweep retries
            log.warning("could not reconcile study %s: %s", study.study_name, error)
            return 0

    sweep()
    if parent:
        try:
            yield Stage(client, experiment_id, parent, sweep)
        finally:
            sweep(ending=True)
        return
    if run_id is None:
        run_id = start_parent(client, experiment_id, study.study_name, tags, name)
    monitor = (
        _system_metrics(client.tracking_uri, run_id, system_metrics)
        if system_metrics
        else contextlib.nullcontext()
    )
    with ended(client, run_id), heartbeat(client, run_id, liveness.heartbeat_interval):
        try:
            with monitor:
                yield Stage(client, experiment_id, run_id, sweep)
        finally:
            sweep(ending=True)
            if on_end is not None:
                on_end(run_id)


def log_summary(
    client: MlflowClient, run_id: str, study: optuna.Study, metric: str, plots: bool = True
) -> None:
    """The study's counts and best value as metrics, its summary as JSON, and its plots."""
    summary = asdict(report.summary(study))
    numbers = {k: summary[k] for k in ("trials", "complete", "pruned", "fail")}
    if summary["best_value"] is not None and math.isfinite(summary["best_value"]):
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

    def __init__(
        self,
        client: MlflowClient,
        experiment_id: str,
        parent_run_id: str,
        tags: dict,
        on_start: Callable[[], object] | None = None,
    ):
        self.client = client
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.tags = tags
        # Run as each trial starts (Stage.reconcile: what died since is closed now, as Optuna
        # fails stale trials then); an error there is logged, never the trial's.
        self.on_start = on_start
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
        # Optuna's heartbeat), so storage.why_dead's age rule never fails it, however slow
        # MLflow is.
        trial.set_user_attr(WORKER_ATTR, worker)
        tags = {
            MLFLOW_PARENT_RUN_ID: self.parent_run_id,
            MLFLOW_RUN_NAME: f"trial-{trial.number}",
            "optuna.study": trial.study.study_name,
            "optuna.trial_number": str(trial.number),
            "faceopt.worker": worker,
            **owner_tags(),
            "state": "RUNNING",
            **self.tags,
        }
        retry_of = trial.study._storage.get_trial_system_attrs(trial._trial_id).get("failed_trial")
        if retry_of is not None:
            tags["optuna.retry_of"] = str(retry_of)
        run_id = self.client.create_run(self.experiment_id, tags=tags).info.run_id
        trial.set_user_attr(RUN_ID_ATTR, run_id)
        self._log_async(run_id, {"trial_number": trial.number}, step=0)
        if self.on_start is not None:
            try:
                self.on_start()
            except Exception as error:
                log.warning("could not reconcile as trial %d started: %s", trial.number, error)
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
        """A trial whose worker died: close its run as FAILED, never RUNNING."""
        close_stale_trial_run(self.client, study, trial, self.experiment_id)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.states[trial.state] += 1
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if run_id is None:  # the trial failed before its run was created
            return
        for future in self._pending.pop(run_id, []):
            future.result()
        close_trial_run(self.client, run_id, trial)
