"""Several worker processes on one study: spawn them, share the cores (or GPUs), run to a goal."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import subprocess
import time
from collections import Counter
from collections.abc import Callable

import optuna
import torch
from optuna.trial import TrialState
from tqdm.auto import tqdm

from pipeline import storage
from pipeline.config import Settings

log = logging.getLogger(__name__)

DONE = (TrialState.COMPLETE, TrialState.PRUNED)
IDLE_POLL = 1.0  # seconds between an idle worker's counts of the study's trials


def counts(study: optuna.Study) -> Counter:
    return Counter(t.state for t in study.get_trials(deepcopy=False))


def finished(study: optuna.Study) -> int:
    c = counts(study)
    return sum(c[s] for s in DONE)


def plan(workers: int | str) -> list[dict[str, str]]:
    """Extra environment per worker: with GPUs one device each (round robin), else a share of the
    cores, so N workers split the machine instead of each taking every core."""
    gpus = torch.cuda.device_count()
    n = (gpus or 1) if workers == "auto" else int(workers)
    if gpus:
        return [{"CUDA_VISIBLE_DEVICES": str(i % gpus)} for i in range(n)]
    threads = str(max(1, (os.cpu_count() or 1) // n))
    return [{"FACEOPT_TORCH_THREADS": threads, "OMP_NUM_THREADS": threads} for _ in range(n)]


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as FACEOPT_* variables (JSON for non-strings) for a child process."""
    env = {}
    # The reload token is the service's; a child reads it, like any secret, from its environment.
    for name, value in settings.model_dump(mode="json", exclude={"reload_token"}).items():
        if value is not None:
            env[f"FACEOPT_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    # These two names win over FACEOPT_* in Settings; the child must see the same stores.
    env["OPTUNA_STORAGE"], env["MLFLOW_TRACKING_URI"] = settings.storage, settings.tracking_uri
    return env


def spawn(settings: Settings, cmd: list[str], until: int, study: optuna.Study) -> list[int]:
    """Run `cmd` once per worker, with the settings in its environment, to `until` finished
    trials of the study, showing progress; returns their exit codes."""
    base = os.environ | settings_env(settings)
    procs = [subprocess.Popen(cmd, env=base | extra) for extra in plan(settings.workers)]
    log.info("%d workers on study %s until %d finished trials", len(procs), study.study_name, until)
    start = finished(study)
    with tqdm(total=until - start, desc=f"{len(procs)} workers", unit="trial") as bar:
        while any(p.poll() is None for p in procs):
            time.sleep(1)
            bar.n = finished(study) - start
            bar.refresh()
        bar.n = finished(study) - start
        bar.refresh()
    return [p.returncode for p in procs]


class ClaimLock:
    """Cross-process mutex around "count the claimed trials, then create one", so workers that
    finish together cannot both start the last trial: a lock file beside a local SQLite store,
    a PostgreSQL advisory lock for PostgreSQL, else none (then the study may overshoot its goal
    by up to one trial per extra worker)."""

    def __init__(self, url: str, study_name: str):
        self._file, self._pg, self._held = None, None, False
        self._key = int.from_bytes(
            hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True
        )
        path, dsn = storage.sqlite_path(url), storage.postgres_dsn(url)
        if path is not None:
            self._file = open(f"{path}.claim.lock", "w")  # noqa: SIM115 - held for the worker's life
        elif dsn is not None:
            import psycopg

            self._pg = psycopg.connect(dsn, autocommit=True)

    def acquire(self) -> None:
        if self._held:  # PostgreSQL advisory locks stack: take it once
            return
        if self._file:
            fcntl.flock(self._file, fcntl.LOCK_EX)
        elif self._pg:
            self._pg.execute("SELECT pg_advisory_lock(%s)", (self._key,))
        self._held = True

    def release(self) -> None:
        if not self._held:
            return
        if self._file:
            fcntl.flock(self._file, fcntl.LOCK_UN)
        elif self._pg:
            self._pg.execute("SELECT pg_advisory_unlock(%s)", (self._key,))
        self._held = False

    def close(self) -> None:
        self.release()
        for handle in (self._file, self._pg):
            if handle:
                handle.close()


def optimize_until(
    study: optuna.Study,
    run_one: Callable[[Callable[[], None]], None],
    until: int,
    timeout: float | None,
    check_every: float,
    lock: ClaimLock,
) -> None:
    """Start trials while finished + running < until; then wait for the others, failing (every
    check_every seconds) any trial whose worker died (storage.fail_dead_trials: its process gone
    from this machine, its heartbeat stale, or sampled for ten grace periods), so its retry gets
    run here.

    run_one(started) runs one trial and calls started() once the trial exists in the storage;
    the claim lock is held from the count until then.
    """
    deadline = time.time() + timeout if timeout else None
    next_check = time.monotonic() + check_every
    try:
        while not (deadline and time.time() > deadline):
            lock.acquire()
            c = counts(study)
            done = sum(c[s] for s in DONE)
            if done >= until:
                return
            if done + c[TrialState.RUNNING] < until:
                run_one(lock.release)  # a WAITING (retried) trial is taken first by Optuna's ask
                continue
            lock.release()
            # Counting is one query: an idle worker sees the others finish within a second, not
            # a heartbeat interval later.
            time.sleep(min(IDLE_POLL, check_every))
            if time.monotonic() >= next_check:
                storage.fail_dead_trials(study)
                next_check = time.monotonic() + check_every
    finally:
        lock.close()
