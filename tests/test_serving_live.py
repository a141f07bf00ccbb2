"""The service as users run it: a real uvicorn process, real HTTP, a real browser."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image

from pipeline.config import Settings
from tests.conftest import (
    REAL_DATA,
    astronaut_face,
    free_port,
    jpeg,
    require_service,
    server_process,
)

SAMPLES = REAL_DATA / "utkface_sample"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

# Real server processes (make test, not the edit loop), started once per module: its tests share
# one pytest-xdist process.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("serving_live")]


@contextmanager
def running_server(registered: Settings, log: Path, *flags: str, env: dict | None = None):
    """`faceopt serve` as a real process on the test registry; its URL once /ready says 200."""
    port = free_port()
    env = os.environ | {"MLFLOW_TRACKING_URI": registered.tracking_uri} | (env or {})
    cmd = [sys.executable, "-m", "pipeline.cli", "serve", "--port", str(port), *flags]
    url = f"http://127.0.0.1:{port}"
    with server_process(cmd, f"{url}/ready", env, log, timeout=60) as proc:
        yield url, proc


@pytest.fixture(scope="module")
def server(registered: Settings, tmp_path_factory):
    """One process, the reload token unset: what a user starts first."""
    log = tmp_path_factory.mktemp("server") / "uvicorn.log"
    with running_server(registered, log, "--model-name", "faces") as (url, _):
        yield url


TOKEN = "live-s3cret"
BODY_TIMEOUT = 2  # seconds; the default 30 would keep the slowloris test waiting


@pytest.fixture(scope="module")
def workers_server(registered: Settings, tmp_path_factory):
    """--workers 2, the reload token of the environment set, a short FACEOPT_BODY_TIMEOUT; its
    URL and the supervising process. One server for the tests that need these, as starting one
    is seconds of imports per process."""
    log = tmp_path_factory.mktemp("server") / "uvicorn.log"
    env = {"FACEOPT_RELOAD_TOKEN": TOKEN, "FACEOPT_BODY_TIMEOUT": str(BODY_TIMEOUT)}
    flags = ("--model-name", "faces", "--workers", "2")
    with running_server(registered, log, *flags, env=env) as (url, proc):
        yield url, proc


def answering_process(response: httpx.Response, workers: list[int]) -> int:
    """The worker process that holds the server end of the connection `response` came on (the
    connection is still open: the client keeps it alive)."""
    client = tuple(response.extensions["network_stream"].get_extra_info("client_addr"))
    holders = [
        pid
        for pid in workers
        if any(c.raddr and tuple(c.raddr) == client for c in psutil.Process(pid).net_connections())
    ]
    assert len(holders) == 1, (client, holders)
    return holders[0]


def test_several_worker_processes_serve_the_champion(workers_server) -> None:
    """--workers 2: two processes, both answering (each answer is traced to the process that
    holds its connection), each loaded with the champion the flags named, each with the reload
    token of the environment."""
    face = io.BytesIO()
    Image.new("RGB", (120, 120), (90, 90, 90)).save(face, format="JPEG")
    url, proc = workers_server
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    workers = [
        int(pid)
        for pid in children
        if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    ]
    assert len(workers) == 2, children
    predicted, reloaded = set(), set()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    # A new connection each time, until both processes have answered both kinds of request:
    # whichever process takes a connection answers the same way.
    for _ in range(60):
        with httpx.Client(base_url=url, timeout=30) as http:
            r = http.post("/predict", files=[("files", ("f.jpg", face.getvalue()))])
            assert r.status_code == 200, r.text
            assert r.json()["model"] == {"name": "faces", "version": "1", "alias": "champion"}
            predicted.add(answering_process(r, workers))
        with httpx.Client(base_url=url, timeout=30) as http:
            r = http.post("/reload", headers=auth)
            assert r.status_code == 200, r.text
            reloaded.add(answering_process(r, workers))
            assert http.post("/reload").status_code == 401
        if predicted == reloaded == set(workers):
            break
    assert predicted == reloaded == set(workers)


def test_a_body_that_never_arrives_gets_408(workers_server) -> None:
    """A client that declares a body and sends it too slowly (a slowloris) is answered 408 once
    FACEOPT_BODY_TIMEOUT has passed, and the connection is freed."""
    url, _ = workers_server
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(
            b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n"
        )
        start = time.monotonic()
        answer = s.recv(4096).decode("latin-1")
        waited = time.monotonic() - start
        while not answer.endswith("}"):  # headers and body may come in separate packets
            more = s.recv(4096).decode("latin-1")
            if not more:
                break
            answer += more
    assert answer.startswith("HTTP/1.1 408"), answer
    assert "FACEOPT_BODY_TIMEOUT" in answer and 0.8 * BODY_TIMEOUT < waited < 10
    assert httpx.get(f"{url}/health").status_code == 200


def test_real_server_answers_the_utkface_sample(server: str) -> None:
    if not SAMPLES.is_dir():
        pytest.skip(f"no UTKFace sample at {SAMPLES} (it comes with ../shared/data)")
    files = sorted(SAMPLES.glob("*.jpg"))
    assert files
    answered = 0
    with httpx.Client(base_url=server, timeout=60) as http:
        for start in range(0, len(files), 16):
            batch = files[start : start + 16]
            r = http.post(
                "/predict", files=[("files", (f.name, f.read_bytes(), "image/jpeg")) for f in batch]
            )
            assert r.status_code == 200, r.text
            predictions = r.json()["predictions"]
            assert [p["filename"] for p in predictions] == [f.name for f in batch]
            answered += sum(p["age"] is not None for p in predictions)
        assert http.get("/health").json()["status"] == "ok"
        assert "faceopt_images_per_request_count" in http.get("/metrics").text
    assert answered >= 0.99 * len(files)  # aligned face crops are answered


def test_browser_uploads_and_sees_predictions(server: str, tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        require_service("chromium", "Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    photo, empty = tmp_path / "face.jpg", tmp_path / "wall.png"
    photo.write_bytes(jpeg(astronaut_face()))
    Image.new("RGB", (300, 200), (120, 120, 120)).save(empty)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page()
            page.goto(server)
            page.wait_for_function(
                "document.getElementById('model').textContent.includes('version')"
            )
            page.set_input_files("#files", [str(photo), str(empty)])
            page.wait_for_selector(".prediction", timeout=30_000)
            card, no_face = page.locator(".prediction").all()
            assert "face.jpg" in card.inner_text()
            for head in ("age", "ethnicity", "gender"):
                label = card.locator(f"[data-head={head}] .label").inner_text()
                assert label, head
            assert card.locator(".bar").count() == 5 + 5 + 2
            assert "No face found" in no_face.inner_text() and no_face.locator(".bar").count() == 0
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        finally:
            browser.close()


def schemathesis(url: str, log: Path, *flags: str) -> None:
    """schemathesis against the live service's own OpenAPI document, every check on (see
    tests/schemathesis.toml); fails the test with its report when it finds anything."""
    st = Path(sys.executable).with_name("st")
    config = Path(__file__).with_name("schemathesis.toml")
    cmd = [str(st), "--config-file", str(config), "--no-color", "run", f"{url}/openapi.json"]
    cmd += ["--max-examples", "60", "--workers", "1", "--seed", "1", *flags]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=log.parent)
    log.write_text(done.stdout + done.stderr)
    assert done.returncode == 0, done.stdout[-6000:]
    assert " passed" in done.stdout and "failure" not in done.stdout


def test_schemathesis_finds_nothing(server: str, workers_server, tmp_path: Path) -> None:
    """/predict, /reload, /model, /ready, /health, with the reload token unset and set."""
    schemathesis(server, tmp_path / "st-no-token.log")
    url, _ = workers_server
    schemathesis(url, tmp_path / "st-token.log", "-H", f"Authorization: Bearer {TOKEN}")
    schemathesis(url, tmp_path / "st-token-missing.log", "--include-path", "/reload")
