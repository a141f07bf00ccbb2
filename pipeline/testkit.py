"""What tests, benchmarks and the docs' screenshot script share: synthetic faces, a free port, a
server process, the machine's name."""

from __future__ import annotations

import os
import platform
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import pandas as pd


def machine(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The processor and the core count, as benchmark results and `make test`'s header name them
    ("AMD EPYC (family 26 model 2), 2 cores"): times compare only on one processor. The first
    processor's entry of Linux's cpuinfo; elsewhere, what the platform says."""
    try:
        first = Path(cpuinfo).read_text().split("\n\n")[0]
    except OSError:
        first = ""
    fields: dict[str, str] = {}
    for line in first.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return f"{name}, {os.cpu_count()} cores"


_DIGITS = [str(v) for v in range(256)]  # a pixel's text: 5x faster than str() of numpy's uint8


def synthetic_faces(n: int, seed: int = 0) -> pd.DataFrame:
    """Rows in the Kaggle layout whose pixels carry a learnable signal for every label."""
    rng = np.random.default_rng(seed)
    age = rng.integers(1, 90, n)
    eth = rng.integers(0, 5, n)
    gender = rng.integers(0, 2, n)
    base = rng.normal(120, 20, (n, 48, 48))
    base[:, :8, :] += (age[:, None, None] / 90) * 80  # forehead brightness ~ age
    base[:, 40:, :] += eth[:, None, None] * 15
    base[:, :, :6] += gender[:, None, None] * 60
    pixels = np.clip(base, 0, 255).astype(np.uint8).reshape(n, -1)
    return pd.DataFrame(
        {
            "age": age,
            "ethnicity": eth,
            "gender": gender,
            "img_name": [f"2017010{i:09d}.jpg.chip.jpg" for i in range(n)],
            "pixels": [" ".join(map(_DIGITS.__getitem__, row)) for row in pixels.tolist()],
        }
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a server to start on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_process(
    cmd: list[str], ready_url: str, env: dict, log: Path, timeout: float = 180
) -> Iterator[subprocess.Popen]:
    """A server process for the duration of the block, once `ready_url` answers 200; stopped
    afterwards, with whatever it started."""
    import httpx  # a dev dependency: the package itself never makes HTTP requests

    with open(log, "w") as out:  # its own session: stopping it stops what it started too
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + timeout
        # One client for every poll: each new one loads the CA bundle (tens of ms of CPU that the
        # starting server needs), though the URL is plain http.
        with httpx.Client(timeout=2) as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{cmd[:4]} exited: {log.read_text()[-3000:]}")
                try:
                    if client.get(ready_url).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{cmd[:4]} not ready in {timeout:.0f} s: {log.read_text()[-3000:]}"
                    )
                time.sleep(0.5)
        yield proc
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
