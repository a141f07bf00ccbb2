"""The Optuna study: data in, one objective per trial, every trial logged to MLflow."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import signal
import tempfile
import threading
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np
import optuna
import torch
from optuna.storages import BaseStorage

from pipeline import data, labels, model, report, samplers, space, storage, tracking, train, workers
from pipeline.config import Settings

log = logging.getLogger(__name__)

# Recorded on the study when it is created; a later run on the same study must agree, so that
# trials stay comparable and train-best rebuilds exactly the split the study selected on.
# Epochs too: a trial's schedule spans its epochs, so trials of other lengths are not comparable.
STUDY_ATTRS = ("data_fingerprint", "split_digest", "space", "metric", "age_edges", "epochs")
LIBRARIES = ("torch", "optuna", "mlflow", "numpy", "scikit-optimize", "madgrad", "faceopt")


# Set by Ctrl-C. Python drops an exception raised inside a finaliser or GC callback ("Exception
# ignored in ..."), and a SIGINT can land there; the flag lets the next epoch stop the trial anyway.
INTERRUPTED = threading.Event()


def _on_sigint(signum: int, frame) -> None:
    INTERRUPTED.set()
    signal.default_int_handler(signum, frame)


@contextlib.contextmanager
def catch_sigint():
    """Record Ctrl-C in INTERRUPTED while trials run (signal handlers live in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    INTERRUPTED.clear()
    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def stop_if_interrupted() -> None:
    if INTERRUPTED.is_set():
        raise KeyboardInterrupt


class StudyMismatch(ValueError):
    """The named study was created with other data, split, space or metric."""


def study_attrs(settings: Settings, faces: data.FaceSet, split: data.Split) -> dict:
    return {
        "data_fingerprint": faces.fingerprint,
        "split_digest": split.digest(),
        "split_seed": split.seed,
        "test_fraction": settings.test_fraction,
        "val_fraction": settings.val_fraction,
        "drop_conflicting": settings.skip_bad_rows,
        "space": settings.space,
        "metric": settings.metric,
        "age_edges": list(settings.age_edges),
        "epochs": settings.epochs,
    }


def open_study(
    settings: Settings, attrs: dict, store: BaseStorage | str | None = None, salt: int = 0
) -> optuna.Study:
    """Create the study or load it (load_if_exists), checking it was made with the same setup."""
    study = optuna.create_study(
        storage=store or settings.storage,
        study_name=settings.study,
        direction="maximize",
        pruner=samplers.make_pruner(settings.pruner, settings.epochs),
        load_if_exists=True,
    )
    # A resumed study must not replay the same random draws: seed by how far the study got,
    # and (salt) by worker, so processes joining at once do not propose the same points.
    study.sampler = samplers.make_sampler(
        settings.sampler, settings.seed + len(study.trials) + salt, **settings.sampler_args
    )
    recorded = study.user_attrs
    if not recorded:
        for key, value in attrs.items():
            study.set_user_attr(key, value)
        return study
    for key in STUDY_ATTRS:
        if recorded.get(key) != attrs[key]:
            raise StudyMismatch(
                f"study {settings.study!r} in {storage.redact(settings.storage)} was created with {key}="
                f"{recorded.get(key)!r}, this run has {attrs[key]!r}; use the same settings "
                "to add trials to it, or a new STUDY name"
            )
    return study


def make_objective(
    settings: Settings,
    train_set: train.Tensors,
    val_set: train.Tensors,
    logger: tracking.TrialLogger,
    precision: train.Precision = train.FP32,
) -> Callable[[optuna.Trial], float]:
    """Objective: suggest params, build, train; report every epoch and stop when pruned."""
    key = train.metric_key(settings.metric)
    classes = labels.num_classes(settings.age_edges)
    device = train_set.x.device

    def objective(trial: optuna.Trial) -> float:
        run_id = logger.start(trial)
        try:
            stop_if_interrupted()
            params = space.suggest(trial, settings.space)
            logger.log_params(run_id, params)
            seed = settings.seed + trial.number
            trial.set_user_attr("seed", seed)  # train-best retrains with the same one
            train.seed_everything(seed)
            net = model.build(params, classes).to(device)

            def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
                stop_if_interrupted()
                logger.log_epoch(run_id, epoch, metrics)
                trial.report(metrics[key], epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after epoch {epoch}")

            history = train.fit(
                net, params, train_set, val_set, settings.epochs, seed, on_epoch, precision
            )
        except optuna.TrialPruned:
            raise
        except Exception as e:
            logger.fail(run_id, e)
            raise
        except BaseException as e:  # Ctrl-C: Optuna runs no callback, so close the run here
            logger.fail(run_id, e, status="KILLED")
            raise
        values = [h[key] for h in history]
        trial.set_user_attr("best_epoch", int(np.argmax(values)))
        return max(values)

    return objective


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def run(settings: Settings) -> dict:
    """Add settings.n_trials trials to the study, in this process or in settings.workers processes."""
    if settings.workers != 1:
        return run_workers(settings)
    return run_worker(settings)


def run_workers(settings: Settings) -> dict:
    """Spawn worker processes on one study under one parent run; plots and summary made once here."""
    faces, split, attrs = load_data(settings)
    client = tracking.client_for(settings.tracking_uri)
    study = open_study(
        settings,
        attrs,
        storage.open_storage(settings.storage, settings.heartbeat_interval, settings.grace_period),
    )
    until = workers.finished(study) + settings.n_trials
    experiment_id = tracking.ensure_experiment(client, settings.study, settings.artifact_root)
    parent = tracking.start_parent(
        client,
        experiment_id,
        settings.study,
        {"workers": str(settings.workers), "data.fingerprint": faces.fingerprint},
    )
    _log_setup(client, parent, settings, attrs, split)
    status = "FAILED"
    try:
        codes = workers.spawn(settings, parent, until, study)
        if any(codes):
            raise RuntimeError(f"worker exit codes {codes}; see their messages above")
        status = "FINISHED"
    except KeyboardInterrupt:  # the workers got the same Ctrl-C and close their own trials
        status = "KILLED"
        raise
    finally:
        _close_parent(client, parent, study, status, settings.metric)
    return report.summary(study)


def run_worker(
    settings: Settings,
    parent_run_id: str | None = None,
    until: int | None = None,
    progress: bool = True,
) -> dict:
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
    train_set = train.to_tensors(faces, split.train, settings.age_edges, device)
    val_set = train.to_tensors(faces, split.val, settings.age_edges, device)

    with storage.init_lock(settings.tracking_uri):
        client = tracking.client_for(settings.tracking_uri)
        experiment_id = tracking.ensure_experiment(client, settings.study, settings.artifact_root)
    run_tags = {
        "device": str(device),
        "precision": precision.name,
        "sampler": settings.sampler,
        "pruner": settings.pruner,
    }
    own_parent = parent_run_id is None
    parent = parent_run_id or tracking.start_parent(
        client, experiment_id, settings.study, {**run_tags, "data.fingerprint": faces.fingerprint}
    )
    logger = tracking.TrialLogger(client, experiment_id, parent, run_tags)
    on_stale = storage.retry_stale(settings.max_retry, before=logger.stale)
    with storage.init_lock(settings.storage):
        study = open_study(
            settings,
            attrs,
            storage.open_storage(
                settings.storage, settings.heartbeat_interval, settings.grace_period, on_stale
            ),
            salt=0 if until is None else os.getpid(),
        )
    if own_parent:
        _log_setup(client, parent, settings, attrs, split)
    objective = make_objective(settings, train_set, val_set, logger, precision)
    status = "FAILED"
    try:
        with catch_sigint():
            _optimize(study, objective, logger, settings, until, progress)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if own_parent:
            last = until is None or not workers.counts(study)[optuna.trial.TrialState.RUNNING]
            _close_parent(client, parent, study, status, settings.metric, plots=last)
    return report.summary(study)


def _optimize(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], float],
    logger: tracking.TrialLogger,
    settings: Settings,
    until: int | None,
    progress: bool,
) -> None:
    """n_trials more trials; or, as one of several workers, trials until `until` have finished."""
    catch = (Exception,)  # a failed trial is recorded as FAIL and the study goes on
    if until is None:
        study.optimize(
            objective,
            n_trials=settings.n_trials,
            timeout=settings.timeout,
            n_jobs=settings.n_jobs,
            callbacks=[logger],
            catch=catch,
            show_progress_bar=progress,
        )
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


def load_data(settings: Settings) -> tuple[data.FaceSet, data.Split, dict]:
    faces = data.load(settings.data, settings.cache_dir, settings.skip_bad_rows)
    split = data.split(
        faces,
        settings.age_edges,
        settings.split_seed_or_seed,
        settings.test_fraction,
        settings.val_fraction,
        drop_conflicting=settings.skip_bad_rows,
    )
    return faces, split, study_attrs(settings, faces, split)


def _log_setup(client, run_id: str, settings: Settings, attrs: dict, split: data.Split) -> None:
    """What a reader of the parent run needs to reproduce it: settings, data, split, versions."""
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
        }
    )
    params["storage"] = storage.redact(params["storage"])  # the tracking store is widely read
    tracking.log_params(
        client, run_id, params | {f"split_{k}": v for k, v in split.summary().items()}
    )
    tracking.log_json(client, run_id, {"study_attrs": attrs, "versions": versions()}, "setup.json")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "split.npz"
        np.savez(path, train=split.train, val=split.val, test=split.test)
        client.log_artifact(run_id, str(path))


def _close_parent(
    client, run_id: str, study: optuna.Study, status: str, metric: str, plots: bool = True
) -> None:
    """Summary and plots on the parent run; never lets a plotting problem hide the study's result."""
    summary = report.summary(study)
    try:
        numbers = {k: summary[k] for k in ("trials", "complete", "pruned", "fail")}
        if "best_value" in summary and math.isfinite(summary["best_value"]):
            numbers["best_value"] = summary["best_value"]
        tracking.log_metrics(client, run_id, numbers)
        tracking.log_json(client, run_id, summary, "summary.json")
        if plots:
            log_plots(client, run_id, study, metric)
    finally:
        client.set_terminated(run_id, status=status)


def log_plots(client, run_id: str, study: optuna.Study, metric: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for path in report.write_plots(study, Path(tmp), f"val {metric} accuracy"):
            client.log_artifact(run_id, str(path), artifact_path="plots")


def report_run(settings: Settings, run_id: str | None = None) -> str:
    """Plots and summary of the whole study, on `run_id` or on a new run in its experiment."""
    study = optuna.load_study(study_name=settings.study, storage=settings.storage)
    client = tracking.client_for(settings.tracking_uri)
    if run_id is None:
        experiment_id = tracking.ensure_experiment(client, settings.study, settings.artifact_root)
        run_id = tracking.start_parent(
            client, experiment_id, settings.study, {"faceopt.report": "1"}
        )
    _close_parent(
        client, run_id, study, "FINISHED", study.user_attrs.get("metric", settings.metric)
    )
    return run_id
