"""Optuna storage from a URL: safe for several processes, with heartbeats to retry dead workers' trials."""

from __future__ import annotations

import fcntl
import logging
import sqlite3
import warnings
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryFailedTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

SQLITE = "sqlite:///"
JOURNAL = "journal:"
StaleCallback = Callable[[optuna.Study, FrozenTrial], None]


def redact(url: str) -> str:
    """`url` without its password (user:***@host), for logs, MLflow and messages: a tracking
    store is read by many people. Anything that is not a URL comes back as it is."""
    try:
        parsed = make_url(url)
    except Exception:  # a file path, journal:..., http://... (no password form we log)
        return url
    if parsed.password is None and not set(parsed.query) & {"password", "passwd"}:
        return url
    query = {k: "***" if k in ("password", "passwd") else v for k, v in parsed.query.items()}
    return parsed.set(query=query).render_as_string(hide_password=True)


def sqlite_path(url: str) -> Path | None:
    """The file behind a local sqlite:/// URL, else None."""
    if not url.startswith(SQLITE) or url == SQLITE + ":memory:":
        return None
    return Path(url.removeprefix(SQLITE))


def enable_wal(url: str) -> None:
    """Write-ahead logging on a local SQLite file: readers stop blocking the writer and several
    processes can share it. The mode is stored in the file, so once is enough."""
    path = sqlite_path(url)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path, timeout=60) as db:
        db.execute("PRAGMA journal_mode=WAL")


@contextmanager
def init_lock(*urls: str):
    """Hold an exclusive file lock beside each local SQLite store while it is created or migrated:
    workers started together would otherwise race on creating the same tables."""
    with ExitStack() as stack:
        for url in urls:
            path = sqlite_path(url)
            if path is None:
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = stack.enter_context(open(f"{path}.lock", "w"))
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield


def open_storage(
    url: str, heartbeat_interval: int, grace_period: int, on_stale: StaleCallback | None = None
) -> BaseStorage:
    """RDB storage (SQLite in WAL mode with a long busy timeout, or any SQLAlchemy URL) with
    heartbeats; `journal:<file>` for Optuna's journal file (no heartbeats there)."""
    if url.startswith(JOURNAL):
        return JournalStorage(JournalFileBackend(url.removeprefix(JOURNAL)))
    engine_kwargs: dict = {"pool_pre_ping": True}
    ensure_postgres_database(url)
    if sqlite_path(url):
        enable_wal(url)
        # A writer waits up to a minute for another instead of failing "database is locked".
        engine_kwargs = {"connect_args": {"timeout": 60}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=on_stale,
        )


def load_study(url: str, name: str, heartbeat_interval: int, grace_period: int) -> optuna.Study:
    """An existing study, through open_storage like every other user of a study (journal: too);
    KeyError when there is none."""
    return optuna.load_study(
        study_name=name, storage=open_storage(url, heartbeat_interval, grace_period)
    )


@dataclass(frozen=True)
class StudyInfo:
    """One study of a storage, as `train-best` chooses among them."""

    name: str
    trials: int
    complete: int
    running: int
    best: float | None
    last_start: datetime | None  # when its newest trial started


def studies(url: str, heartbeat_interval: int, grace_period: int) -> list[StudyInfo]:
    """Every study in the storage, the one whose newest trial started last first."""
    store = open_storage(url, heartbeat_interval, grace_period)
    found = []
    for summary in optuna.get_all_study_summaries(store, include_best_trial=False):
        study_id = store.get_study_id_from_name(summary.study_name)
        trials = store.get_all_trials(study_id, deepcopy=False)
        complete = [t.value for t in trials if t.state == TrialState.COMPLETE]
        starts = [t.datetime_start for t in trials if t.datetime_start is not None]
        found.append(
            StudyInfo(
                name=summary.study_name,
                trials=len(trials),
                complete=len(complete),
                running=sum(t.state == TrialState.RUNNING for t in trials),
                best=max(complete) if complete else None,
                last_start=max(starts) if starts else None,
            )
        )
    return sorted(found, key=lambda s: s.last_start or datetime.min, reverse=True)


def retry_stale(max_retry: int, before: StaleCallback | None = None) -> StaleCallback:
    """Run `before` (close the trial's MLflow run), then queue the trial again with its params."""
    # Optuna 4.9 renamed the callback; take the new name where it exists.
    retry_class = getattr(
        optuna.storages, "RetryHeartbeatStaleTrialCallback", RetryFailedTrialCallback
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = retry_class(max_retry=max_retry)

    def callback(study: optuna.Study, trial: FrozenTrial) -> None:
        log.warning("trial %d lost its worker (no heartbeat); retrying it", trial.number)
        if before:
            before(study, trial)
        retry(study, trial)

    return callback


def postgres_dsn(url: str, database: str | None = None) -> str | None:
    """A psycopg connection string for a postgresql[+driver]:// SQLAlchemy URL, else None."""
    parsed = make_url(url)
    if not parsed.drivername.startswith("postgresql"):
        return None
    parsed = parsed.set(drivername="postgresql", database=database or parsed.database)
    return parsed.render_as_string(hide_password=False)


def ensure_postgres_database(url: str) -> None:
    """Create the database a postgresql:// URL names when it does not exist yet (needs psycopg)."""
    name = make_url(url).database
    admin = postgres_dsn(url, database="postgres")
    if admin is None or not name:
        return
    import psycopg
    from psycopg import sql

    with psycopg.connect(admin, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        if exists.fetchone() is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            log.info("created PostgreSQL database %s", name)
