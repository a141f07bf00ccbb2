"""The objective of a trial: suggest params, build, train, report each epoch, stop when pruned."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable

import numpy as np
import optuna

from pipeline.config import Settings
from pipeline.data import labels
from pipeline.data.inputs import SEED_FORM, InputSpec
from pipeline.model import network, space
from pipeline.tracking import runs
from pipeline.training import train

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


def make_objective(
    settings: Settings,
    train_set: train.Tensors,
    val_set: train.Tensors,
    logger: runs.TrialLogger,
    precision: train.Precision = train.FP32,
    form: InputSpec = SEED_FORM,
) -> Callable[[optuna.Trial], float]:
    """Objective: suggest params, build, train; report every epoch and stop when pruned. The
    faces come in `form`; each trial's network takes the inputs its params choose."""
    key = train.metric_key(settings.metric)
    classes = labels.num_classes(settings.age_edges)
    device = train_set.device

    def objective(trial: optuna.Trial) -> float:
        run_id = logger.start(trial)
        try:
            stop_if_interrupted()
            params = space.suggest(trial, settings.space, settings.features)
            logger.log_params(run_id, params)
            seed = settings.seed + trial.number
            trial.set_user_attr("seed", seed)  # train-best retrains with the same one
            train.seed_everything(seed)
            spec = network.input_spec(params, form)
            net = network.build(params, classes, spec=spec).to(device)

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
