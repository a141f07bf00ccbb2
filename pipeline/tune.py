"""The Optuna study: data in, one objective per trial, every trial logged to MLflow."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import optuna
import torch

# torch.optim imports its compiler when it makes the first optimizer: 1.4 s of CPU in a process
# that trains, 0.8 s here, where a command loads its imports without cycle collection (cli.startup).
import torch._dynamo  # noqa: F401
from tqdm.auto import tqdm

from pipeline import config, storage
from pipeline.config import Settings
from pipeline.data import dataset
from pipeline.errors import FaceoptError
from pipeline.tracking import report, runs
from pipeline.training import train
from pipeline.tuning import workers
from pipeline.tuning.objective import catch_sigint, make_objective
from pipeline.tuning.study import data_form, load_data, open_study, read_enqueue, versions

log = logging.getLogger(__name__)


class TrialsFailed(FaceoptError):
    """Every trial this invocation ran failed: a broken objective must not look like a result."""


def run(settings: Settings) -> report.StudySummary:
    """Add settings.n_trials trials to the study, in this process or in settings.workers processes."""
    if settings.enqueue:  # a bad file fails now, not after the data is decoded
        read_enqueue(settings.enqueue, settings.space, settings.features)
    result = run_workers(settings) if settings.workers != 1 else run_worker(settings)
    if settings.preset == "auto":
        log.info(
            "a first study of %d trials from the known good points; to tune longer (the same "
            "study): make tune PRESET=%s, then make train-best",
            settings.n_trials,
            config.device_preset(),
        )
    return result


def run_workers(settings: Settings) -> report.StudySummary:
    """Spawn worker processes on one study under one parent run; plots and summary made once here."""
    faces, split, attrs = load_data(settings)
    client = runs.client_for(settings.tracking_uri)
    study = open_study(
        settings,
        attrs,
        storage.open_storage(settings.storage, settings.heartbeat_interval, settings.grace_period),
    )
    until = workers.finished(study) + settings.n_trials

    def summary(run_id: str) -> None:
        runs.log_summary(client, run_id, study, settings.metric, plots=settings.study_plots)

    tags = {"workers": str(settings.workers), "data.fingerprint": faces.fingerprint}
    # On Ctrl-C the workers got the same signal and close their own trials.
    with runs.stage_run(
        client,
        settings.study,
        None,
        tags,
        study=study,
        liveness=runs.Liveness.of(settings),
        artifact_root=settings.artifact_root,
        on_end=summary,
    ) as stage:
        _log_setup(client, stage.run_id, settings, attrs, split, faces)
        cmd = [sys.executable, "-m", "pipeline.cli", "tune-worker", "--quiet"]
        cmd += ["--parent-run-id", stage.run_id, "--until", str(until)]
        codes = workers.spawn(settings, cmd, until, study)
        if any(codes):
            raise RuntimeError(f"worker exit codes {codes}; see their messages above")
    return report.summary(study)


def run_worker(
    settings: Settings,
    parent_run_id: str | None = None,
    until: int | None = None,
    progress: bool = True,
) -> report.StudySummary:
    """Run trials in this process: n_trials more, or (until) to that many finished in the study.

    With parent_run_id the trials' runs go under that run (a coordinator's); otherwise this
    invocation opens its own parent run and, if no other worker is still busy, makes the plots.
    """
    faces, split, attrs = load_data(settings)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    device = train.select_device()
    precision = train.select_precision(device, settings.precision)
    log.info(
        "device: %s (%s); %d faces, split %s", device, precision.name, len(faces), split.summary()
    )
    form = data_form(attrs)
    train_set = train.to_tensors(faces, split.train, settings.age_edges, device, form)
    val_set = train.to_tensors(faces, split.val, settings.age_edges, device, form)

    with storage.init_lock(settings.tracking_uri):
        client = runs.client_for(settings.tracking_uri)
    run_tags = {
        "device": str(device),
        "precision": precision.name,
        "sampler": settings.sampler,
        "pruner": settings.pruner,
    }
    # A trial found dead as another starts (Optuna's stale check): its run closed, then retried.
    on_stale = runs.stale_callback(client, settings.max_retry)
    with storage.init_lock(settings.storage):
        study = open_study(
            settings,
            attrs,
            storage.open_storage(
                settings.storage, settings.heartbeat_interval, settings.grace_period, on_stale
            ),
            salt=0 if until is None else os.getpid(),
        )
    own_parent = parent_run_id is None

    def summary(run_id: str) -> None:  # plots once, by whichever worker finishes last
        plots = settings.study_plots and (
            until is None or not workers.counts(study)[optuna.trial.TrialState.RUNNING]
        )
        runs.log_summary(client, run_id, study, settings.metric, plots=plots)

    stage_run = runs.stage_run(
        client,
        settings.study,
        None,
        {**run_tags, "data.fingerprint": faces.fingerprint},
        study=study,
        liveness=runs.Liveness.of(settings),
        artifact_root=settings.artifact_root,
        parent=parent_run_id,
        system_metrics=settings.system_metrics_interval if settings.tune_system_metrics else None,
        on_end=summary,
    )
    with stage_run as stage, catch_sigint():
        if own_parent:
            _log_setup(client, stage.run_id, settings, attrs, split, faces)
        logger = runs.TrialLogger(
            client, stage.experiment_id, stage.run_id, run_tags, on_start=stage.reconcile
        )
        objective = make_objective(settings, train_set, val_set, logger, precision, form)
        _optimize(study, objective, logger, settings, until, progress)
        ran = logger.states.total()
        if ran and logger.states[optuna.trial.TrialState.FAIL] == ran:
            raise TrialsFailed(
                f"all {ran} trials of this run failed; the first: "
                f"{logger.first_error or 'it failed before its MLflow run was made (see above)'}"
            )
    return report.summary(study)


class TrialsBar:
    """Progress of this run's trials: against its timeout when it has one (time left, not the
    estimate for n_trials a timed study never reaches), else against n_trials."""

    def __init__(self, n_trials: int, timeout: float | None):
        self.timeout = timeout
        self.started = time.monotonic()
        self.done = 0
        unit = "s" if timeout else "trial"
        self.bar = tqdm(total=round(timeout) if timeout else n_trials, desc="tune", unit=unit)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.done += 1
        if self.timeout:
            self.bar.n = min(round(self.timeout), round(time.monotonic() - self.started))
        else:
            self.bar.n = self.done
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        best = f"{study.best_value:.4f}" if complete else "-"
        self.bar.set_postfix(trials=self.done, best=best)

    def close(self) -> None:
        self.bar.close()


def _optimize(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], float],
    logger: runs.TrialLogger,
    settings: Settings,
    until: int | None,
    progress: bool,
) -> None:
    """n_trials more trials; or, as one of several workers, trials until `until` have finished."""
    catch = (Exception,)  # a failed trial is recorded as FAIL and the study goes on
    if until is None:
        bar = TrialsBar(settings.n_trials, settings.timeout) if progress else None
        try:
            study.optimize(
                objective,
                n_trials=settings.n_trials,
                timeout=settings.timeout,
                n_jobs=settings.n_jobs,
                callbacks=[logger, *([bar] if bar else [])],
                catch=catch,
            )
        finally:
            if bar:
                bar.close()
        return

    def run_one(started: Callable[[], None]) -> None:
        def claimed(trial: optuna.Trial) -> float:
            started()  # the trial now exists in the storage: other workers may count it
            return objective(trial)

        study.optimize(claimed, n_trials=1, callbacks=[logger], catch=catch)

    lock = workers.ClaimLock(settings.storage, settings.study)
    workers.optimize_until(
        study, run_one, until, settings.timeout, settings.heartbeat_interval, lock
    )


def _log_setup(
    client,
    run_id: str,
    settings: Settings,
    attrs: dict,
    split: dataset.Split,
    faces: dataset.FaceSet,
) -> None:
    """What a reader of the parent run needs to reproduce it: settings, data (and the files left
    out of it), split, versions."""
    params = settings.model_dump(
        include={
            "data",
            "storage",
            "n_trials",
            "timeout",
            "epochs",
            "space",
            "metric",
            "sampler",
            "sampler_args",
            "pruner",
            "n_jobs",
            "seed",
            "split_seed",
            "workers",
            "test_fraction",
            "val_fraction",
            "age_edges",
            "input_size",
            "colour",
            "features",
            "descriptor",
        }
    )
    params["skipped_files"] = len(faces.skipped)
    params["storage"] = storage.redact(params["storage"])  # the tracking store is widely read
    runs.log_params(client, run_id, params | {f"split_{k}": v for k, v in split.summary().items()})
    setup = {"study_attrs": attrs, "versions": versions(), "skipped_files": list(faces.skipped)}
    runs.log_json(client, run_id, setup, "setup.json")
    runs.log_dataset(
        client, run_id, str(settings.data), attrs["data_fingerprint"], split.sizes(), "tuning"
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "split.npz"
        np.savez(path, train=split.train, val=split.val, test=split.test)
        client.log_artifact(run_id, str(path))


def report_run(settings: Settings, run_id: str | None = None) -> str:
    """Plots and summary of the whole study, on `run_id` or on a new run in its experiment."""
    try:
        study = storage.load_study(
            settings.storage, settings.study, settings.heartbeat_interval, settings.grace_period
        )
    except KeyError as e:
        raise storage.missing_study(settings.storage, settings.study) from e
    with runs.stage_run(
        settings.tracking_uri,
        settings.study,
        None,
        {"faceopt.report": "1"},
        study=study,
        liveness=runs.Liveness.of(settings),
        artifact_root=settings.artifact_root,
        run_id=run_id,
    ) as stage:
        metric = study.user_attrs.get("metric", settings.metric)
        runs.log_summary(stage.client, stage.run_id, study, metric)
    return stage.run_id
