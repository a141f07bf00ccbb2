"""The service's refusals before parsing, the reload endpoint's rules, and no secret in MLflow."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from pipeline import storage, train_best, tune
from pipeline.config import Settings
from serving import decode
from serving.app import create_app
from serving.guard import host_name
from tests.conftest import (
    LOCAL,
    copy_sqlite,
    empty_mlflow_store,
    make_settings,
    synthetic_faces,
    write_csv,
)

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64  # never decoded: every request here is refused first


def service(tmp_path: Path, **update) -> TestClient:
    """The app on an empty registry: enough for everything refused before a model is needed."""
    copy_sqlite(empty_mlflow_store(), tmp_path / "mlflow.db")
    settings = Settings(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=tmp_path / "mlruns"
    ).model_copy(update=update)
    return TestClient(create_app(settings), base_url=LOCAL)


@pytest.mark.slow
def test_reload_is_disabled_without_a_token(tmp_path: Path) -> None:
    """The default: a page on another site that POSTs to the service gets nothing done."""
    with service(tmp_path) as c:
        r = c.post("/reload", headers={"Origin": "https://evil.example"})
        assert r.status_code == 403
        assert "FACEOPT_RELOAD_TOKEN" in r.json()["detail"]


@pytest.mark.parametrize(
    ("authorization", "status"),
    [
        (None, 401),
        (b"Bearer s3cret\xc3\xbc", 503),  # accepted (the token is not ASCII); 503: no model yet
        (b"bearer s3cret\xc3\xbc", 503),  # schemes are case-insensitive
        (b"BEARER  s3cret\xc3\xbc ", 503),
        (b"s3cret\xc3\xbc", 401),  # no scheme
        (b"Basic s3cret\xc3\xbc", 401),
        (b"Bearer wrong", 401),
        ("Bearer ünïcode".encode(), 401),  # not a 500
        (b"Bearer \xff\xfe", 401),
    ],
)
def test_reload_token_rules(tmp_path: Path, authorization: bytes | None, status: int) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    with service(tmp_path, reload_token=SecretStr("s3cretü")) as c:
        r = c.post("/reload", headers=headers)
    assert r.status_code == status, r.text
    if status == 401:
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert "Authorization: Bearer" in r.json()["detail"]
    else:
        assert "no champion" in r.json()["detail"]


def test_host_allow_list(tmp_path: Path) -> None:
    """DNS rebinding: a page served as evil.example that resolves to 127.0.0.1 sends its own
    name as Host, and is refused; the loopback names, with or without a port, are served."""
    with service(tmp_path) as c:
        r = c.get("/health", headers={"Host": "evil.example"})
        assert r.status_code == 400 and "FACEOPT_ALLOWED_HOSTS" in r.json()["detail"]
        for host in ("localhost:8000", "127.0.0.1", "[::1]:8000", "LOCALHOST"):
            assert c.get("/health", headers={"Host": host}).status_code == 200, host
    with service(tmp_path, allowed_hosts=["faces.example"]) as c:
        assert c.get("/health", headers={"Host": "faces.example:443"}).status_code == 200
        assert c.get("/health").status_code == 400  # localhost is no longer in the list
    with service(tmp_path, allowed_hosts=["*"]) as c:
        assert c.get("/health", headers={"Host": "evil.example"}).status_code == 200
    assert [host_name(h) for h in ("a.b:1", "[::1]", "[::1]:80", "::1", "")] == [
        "a.b",
        "::1",
        "::1",
        "::1",
        "",
    ]


def test_allowed_hosts_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("FACEOPT_ALLOWED_HOSTS", "a.example, b.example")
    assert Settings().allowed_hosts == ["a.example", "b.example"]
    monkeypatch.setenv("FACEOPT_ALLOWED_HOSTS", '["c.example"]')
    assert Settings().allowed_hosts == ["c.example"]


@pytest.mark.slow
def test_limits_are_enforced_before_parsing_in_the_services_words(tmp_path: Path) -> None:
    with service(tmp_path, max_body_bytes=20_000, max_files=2) as c:
        # Declared too large: refused from the Content-Length alone.
        r = c.post("/predict", files=[("files", ("big.png", PNG + b"\0" * 30_000, "image/png"))])
        assert r.status_code == 413 and "FACEOPT_MAX_BODY_BYTES" in r.json()["detail"]

        # Streamed without a length (chunked): refused once the count passes the limit.
        def chunks():
            for _ in range(10):
                yield b"x" * 4096

        r = c.post(
            "/predict",
            content=chunks(),
            headers={"Content-Type": "multipart/form-data; boundary=b"},
        )
        assert r.status_code == 413 and "FACEOPT_MAX_BODY_BYTES" in r.json()["detail"]

        r = c.post("/predict", files=[("files", (f"{i}.png", PNG, "image/png")) for i in range(3)])
        assert r.status_code == 413 and "more than 2 files (FACEOPT_MAX_FILES)" in r.text

        r = c.post("/predict", data={f"f{i}": "x" for i in range(9)})
        assert r.status_code == 413 and "Too many fields" in r.json()["detail"]

        r = c.post(
            "/predict",
            content=b"--b\r\nno headers\r\n",
            headers={"Content-Type": "multipart/form-data"},
        )
        assert r.status_code == 400 and "malformed multipart body" in r.json()["detail"]

        r = c.get("/health", headers={"X-Padding": "x" * 20_000})
        assert r.status_code == 431 and "FACEOPT_MAX_HEADER_BYTES" in r.json()["detail"]
        assert c.get("/health").status_code == 200  # and the service is still up

    with service(tmp_path) as c:  # a text field larger than any expected
        r = c.post("/predict", data={"note": "x" * 70_000})
        assert r.status_code == 413 and "Field exceeded" in r.json()["detail"]


def test_the_body_limit_follows_the_file_limits() -> None:
    settings = Settings(max_files=4, max_file_bytes=1000, max_body_bytes=None)
    assert 4 * 1000 < settings.body_limit < 4 * 1000 + 128 * 1024
    assert Settings(max_body_bytes=123).body_limit == 123


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql+psycopg://faces:pa%40ss@db:5432/optuna", "postgresql+psycopg://faces:***@db"),
        ("postgresql://db/optuna?password=pa%40ss&sslmode=require", "sslmode=require"),
        ("http://faces:pa%40ss@tracking:5000", "http://faces:***@tracking:5000"),
        ("sqlite:///optuna.db", "sqlite:///optuna.db"),
        ("journal:./optuna.log", "journal:./optuna.log"),
    ],
)
def test_redact_hides_passwords(url: str, shown: str) -> None:
    redacted = storage.redact(url)
    assert shown in redacted and "pa%40ss" not in redacted and "pa@ss" not in redacted


PASSWORD = "faceopt-Secret-7731"


@pytest.fixture
def postgres_with_password(postgres_database: str) -> str:
    """A URL with a password for a fresh local database (the local server trusts local
    connections, so any password works: what matters is where it ends up)."""
    return f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:5432/{postgres_database}"


@pytest.mark.slow
def test_no_password_reaches_the_tracking_store(
    tmp_path: Path, postgres_with_password: str
) -> None:
    """Tune and register with a storage URL that holds a password, then search every byte the
    tracking store holds (its database and its artifacts) for it."""
    base = make_settings(tmp_path, write_csv(synthetic_faces(120), tmp_path / "faces.csv"))
    settings = base.model_copy(
        update={
            "storage": postgres_with_password,
            "n_trials": 2,
            "train_epochs": 2,
            "model_name": "secret",
        }
    )
    tune.run(settings)
    train_best.run(settings)
    stores = [
        *tmp_path.glob("mlflow.db*"),
        *(p for p in (tmp_path / "mlruns").rglob("*") if p.is_file()),
    ]
    assert len(stores) > 10
    for path in stores:
        assert PASSWORD.encode() not in path.read_bytes(), path


def test_the_decode_pool_bounds_how_many_images_are_decoded_at_once(monkeypatch) -> None:
    """16 uploads at once through a pool of 2: never more than 2 photos in memory together
    (the memory figures themselves are `make bench-abuse`'s)."""
    active, most, lock = 0, 0, threading.Lock()

    def slow_cut(file, name, settings, colour=False):
        nonlocal active, most
        with lock:
            active += 1
            most = max(most, active)
        time.sleep(0.02)
        with lock:
            active -= 1
        return name

    monkeypatch.setattr(decode, "cut_face", slow_cut)
    pool = decode.DecodePool(2)

    async def burst() -> list:
        return await asyncio.gather(*(pool.face(None, f"f{i}", Settings()) for i in range(16)))

    try:
        assert asyncio.run(burst()) == [f"f{i}" for i in range(16)]
    finally:
        pool.close()
    assert most == 2
