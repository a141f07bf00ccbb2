"""Optuna storage from a URL: safe for several processes, with heartbeats and owner records to
retry dead workers' trials."""

from __future__ import annotations

import copy
import fcntl
import logging
import os
import socket
import sqlite3
import warnings
from collections.abc import Callable
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import optuna
import psutil
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryFailedTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url

from pipeline.errors import FaceoptError

log = logging.getLogger(__name__)

SQLITE = "sqlite:///"
JOURNAL = "journal:"
StaleCallback = Callable[[optuna.Study, FrozenTrial], None]
# A trial's system attr: the process that owns it (Owner.record), written as the trial is
# created or taken from the queue, before it is sampled.
OWNER_ATTR = "faceopt.owner"
# A trial's user attr, set first thing when its objective starts (Optuna's heartbeat is running
# by then): "host:pid".
WORKER_ATTR = "worker"
# A process whose start time differs by more than this from the recorded one is another process
# that was given the same pid (Linux derives start times from a boot time that can jitter by 1 s).
START_TOLERANCE_S = 1.0


def _machine() -> str:
    """Where a pid names one process: this host's name, boot and pid namespace (a container
    with its own pid namespace is another machine; after a reboot every pid is another's)."""
    parts = [socket.gethostname()]
    for path, read in (
        ("/proc/sys/kernel/random/boot_id", lambda p: Path(p).read_text().strip()),
        ("/proc/self/ns/pid", os.readlink),
    ):
        with suppress(OSError):  # not Linux: the host name alone
            parts.append(read(path))
    return "/".join(parts)


@dataclass(frozen=True)
class Owner:
    """The process that owns a trial or an MLflow run: on the same machine, whether it still
    exists is known at once (no grace period); elsewhere only its heartbeats tell."""

    host: str  # the host name, for people
    machine: str  # _machine(): where `pid` means this process
    pid: int
    started: float  # the process's start time (seconds since the epoch): a reused pid is not it

    @classmethod
    def current(cls) -> Owner:
        pid = os.getpid()  # per pid: a forked child is its own owner
        if pid not in _CURRENT:
            started = psutil.Process(pid).create_time()
            _CURRENT[pid] = cls(socket.gethostname(), _machine(), pid, round(started, 3))
        return _CURRENT[pid]

    def record(self) -> dict:
        """As a JSON object (an Optuna system attr)."""
        return asdict(self)

    @classmethod
    def from_record(cls, record: object) -> Owner | None:
        try:
            return cls(
                str(record["host"]),
                str(record["machine"]),
                int(record["pid"]),
                float(record["started"]),
            )
        except (TypeError, KeyError, ValueError):  # none, or not one of ours
            return None

    def is_dead(self) -> bool | None:
        """True when its process is gone (or its pid is another process's now), False while it
        runs, None when it ran on another machine and only its heartbeats can tell."""
        if self.machine != _machine():
            return None
        try:
            process = psutil.Process(self.pid)
            if abs(process.create_time() - self.started) > START_TOLERANCE_S:
                return True  # the pid was reused
            return process.status() == psutil.STATUS_ZOMBIE  # killed, not yet reaped
        except psutil.NoSuchProcess:
            return True
        except psutil.AccessDenied:  # it exists, as someone else's: not ours to judge further
            return False

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}"


_CURRENT: dict[int, Owner] = {}


def trial_owner(trial: FrozenTrial) -> Owner | None:
    return Owner.from_record(trial.system_attrs.get(OWNER_ATTR))


def orphan_age(heartbeat_interval: float, grace_period: float) -> float:
    """Seconds after which a RUNNING trial that never reached its objective and whose owner
    cannot be checked (another machine's, or an older faceopt's) is taken for dead. A trial is
    RUNNING from the start of ask() (relative sampling included) before its first heartbeat,
    and Optuna's stale check only sees trials with one: without this rule a worker killed in
    between would leave the trial RUNNING for ever. A trial is sampled in seconds, so ten grace
    periods without reaching the objective is a dead worker."""
    return 10 * max(grace_period, 3 * heartbeat_interval)


def why_dead(trial: FrozenTrial, heartbeat_stale: bool, orphan_after: float) -> str | None:
    """Why a RUNNING trial's worker is taken for dead, or None when it is not. On this machine
    its owner record decides at once; elsewhere (or without one) its heartbeats do, and a trial
    that never reached its objective is dead once older than `orphan_after` seconds."""
    owner = trial_owner(trial)
    dead = owner.is_dead() if owner else None
    if dead is not None:
        return f"its worker process {owner} is gone (killed?)" if dead else None
    if heartbeat_stale:
        return "its worker stopped sending heartbeats (killed?)"
    if WORKER_ATTR in trial.user_attrs or trial.datetime_start is None:
        return None
    # Optuna's datetime_start is the creating worker's naive local time.
    age = (datetime.now() - trial.datetime_start).total_seconds()
    if age > orphan_after:
        return f"it has been RUNNING for {age:.0f} s without reaching its objective (killed?)"
    return None


def death_note(trial: FrozenTrial) -> str:
    """Why a trial failed as stale was taken for dead, for its run's error tag and the log."""
    owner = trial_owner(trial)
    if owner and owner.is_dead():
        return f"its worker process {owner} is gone (killed?)"
    if WORKER_ATTR not in trial.user_attrs:
        return "its worker died before the trial reached its objective (killed?)"
    return "its worker stopped sending heartbeats (killed?)"


class _RecordsOwner:
    """Writes this process as the owner of each trial it creates RUNNING or takes from the
    queue (a retried or enqueued trial), so that a worker killed while it was still sampling
    the trial, before Optuna's first heartbeat, is found too."""

    orphan_after: float = 300.0  # open_storage sets orphan_age(...) of its settings

    def _record_owner(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, OWNER_ATTR, Owner.current().record())

    def set_trial_state_values(self, trial_id, state, values=None) -> bool:
        taken = super().set_trial_state_values(trial_id, state, values)
        if taken and state == TrialState.RUNNING:
            self._record_owner(trial_id)
        return taken


class OwnedRDBStorage(_RecordsOwner, RDBStorage):
    """RDBStorage whose stale trials (those Optuna fails, and retries through the stale-trial
    callback, when a trial starts) are what why_dead says: heartbeats alone only for trials
    owned on other machines."""

    def _create_new_trial(self, study_id, template_trial=None):
        trial = super()._create_new_trial(study_id, template_trial)
        if trial.state == TrialState.RUNNING:
            self._record_owner(trial._trial_id)
        return trial

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        stale = set(super()._get_stale_trial_ids(study_id))
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        return [
            t._trial_id
            for t in running
            if why_dead(t, t._trial_id in stale, self.orphan_after) is not None
        ]


class OwnedJournalStorage(_RecordsOwner, JournalStorage):
    """JournalStorage with owner records (no heartbeats: other machines' trials stay RUNNING)."""

    def create_new_trial(self, study_id, template_trial=None) -> int:
        trial_id = super().create_new_trial(study_id, template_trial)
        if template_trial is None or template_trial.state == TrialState.RUNNING:
            self._record_owner(trial_id)
        return trial_id


def fail_own_trials(study: optuna.Study) -> list[int]:
    """Fail the study's RUNNING trials that this process owns, as its stage ends and it runs none
    any more; their numbers. A Ctrl-C that lands after ask() made a trial and before its
    objective started (where Optuna fails the trial itself) would otherwise leave it RUNNING
    until a later run finds this process gone. Not retried: an interrupted trial did not crash."""
    me = Owner.current()
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return [
        t.number for t in running if trial_owner(t) == me and _fail(study._storage, t._trial_id)
    ]


def _fail(store: BaseStorage, trial_id: int) -> bool:
    """Set the trial FAIL; False when another process finished it first."""
    try:
        return store.set_trial_state_values(trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def fail_dead_trials(study: optuna.Study, on_failed: StaleCallback | None = None) -> list[int]:
    """Fail the study's RUNNING trials whose worker is dead (why_dead) and hand each to the
    storage's stale-trial callback (or `on_failed` where it has none), as Optuna's own stale
    check does when a trial starts; their numbers. Safe to run from several processes at once:
    a trial is failed, and retried, once."""
    store = study._storage
    backend = getattr(store, "_backend", store)  # Optuna wraps an RDBStorage in a cache
    if isinstance(backend, RDBStorage) and backend.heartbeat_interval:
        dead_ids = store._get_stale_trial_ids(study._study_id)
    else:
        orphan_after = getattr(backend, "orphan_after", orphan_age(10, 30))
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        dead_ids = [t._trial_id for t in running if why_dead(t, False, orphan_after)]
    getter = getattr(store, "get_heartbeat_stale_trial_callback", lambda: None)
    callback = getter() or on_failed
    failed = []
    for trial_id in dead_ids:
        if not _fail(store, trial_id):  # another process failed it first
            continue
        trial = copy.deepcopy(store.get_trial(trial_id))
        failed.append(trial.number)
        if callback is not None:
            callback(study, trial)
        else:
            log.warning("trial %d failed: %s", trial.number, death_note(trial))
    return failed


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
    heartbeats; `journal:<file>` for Optuna's journal file (no heartbeats there). Either records
    the process that owns each trial (OWNER_ATTR)."""
    if url.startswith(JOURNAL):
        journal = OwnedJournalStorage(JournalFileBackend(url.removeprefix(JOURNAL)))
        journal.orphan_after = orphan_age(heartbeat_interval, grace_period)
        return journal
    engine_kwargs: dict = {"pool_pre_ping": True}
    ensure_postgres_database(url)
    if sqlite_path(url):
        enable_wal(url)
        # A writer waits up to a minute for another instead of failing "database is locked".
        engine_kwargs = {"connect_args": {"timeout": 60}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        rdb = OwnedRDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=on_stale,
        )
    rdb.orphan_after = orphan_age(heartbeat_interval, grace_period)
    return rdb


def load_study(
    url: str,
    name: str,
    heartbeat_interval: int,
    grace_period: int,
    on_stale: StaleCallback | None = None,
) -> optuna.Study:
    """An existing study, through open_storage like every other user of a study (journal: too);
    KeyError when there is none."""
    return optuna.load_study(
        study_name=name, storage=open_storage(url, heartbeat_interval, grace_period, on_stale)
    )


@dataclass(frozen=True)
class StudyInfo:
    """One study of a storage, as `choose_study` sees it."""

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


class StudyChoiceError(FaceoptError, ValueError):
    """No study by that name in the storage, or no clear choice of one."""


def choose_study(
    url: str, name: str, named: bool, heartbeat_interval: int, grace_period: int, command: str
) -> str:
    """The study `command` (`make train-best`, `make report`) works on: `name` when the user
    named it, else the one tuned last in the storage (the study whose newest trial started
    last), so that it follows `make tune` without repeating its settings. Refused, with every
    study and the command for each, when that is not the one a user means: several studies are
    being tuned right now, or the last one has no completed trial while another has."""
    found = [] if named else studies(url, heartbeat_interval, grace_period)
    if not found:
        return name
    latest = found[0]
    busy = [s.name for s in found if s.running]
    if len(busy) > 1:
        why = f"studies {busy} are being tuned right now"
    elif not latest.complete and any(s.complete for s in found[1:]):
        why = f"the study tuned last, {latest.name!r}, has no completed trial yet"
    else:
        log.info(
            "%s: study %r, the one tuned last in %s (STUDY=... to choose another)",
            command,
            latest.name,
            redact(url),
        )
        return latest.name
    lines = [f"which study to use is not clear: {why}. The studies in {redact(url)}:"]
    for s in found:
        best = f"best {s.best:.4f}" if s.best is not None else "no completed trial"
        started = f"{s.last_start:%Y-%m-%d %H:%M}" if s.last_start else "never"
        lines.append(
            f"  {s.name}: {s.trials} trials ({s.running} running), {best}, last trial started "
            f"{started}: {command} STUDY={s.name}"
        )
    raise StudyChoiceError("\n".join(lines))


def missing_study(url: str, name: str) -> StudyChoiceError:
    """What a command says when study `name` is not in the storage."""
    return StudyChoiceError(
        f"no study {name!r} in {redact(url)}: run `make tune` first (or pass STUDY=... and "
        "STORAGE=... of an existing study)"
    )


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
        log.warning("trial %d failed: %s; retrying it", trial.number, death_note(trial))
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
