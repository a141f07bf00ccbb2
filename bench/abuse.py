"""`make bench-abuse`: hostile uploads against a real `faceopt serve` process of the champion,
at the service's default settings. Prints, per case, the answers and the server's peak resident
memory (sampled every 20 ms, and the kernel's high-water mark), then the memory one minute after
the last burst against the idle memory before the first; writes the table to bench/results/."""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import select
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench import RESULTS, require_champion, save
from pipeline.config import Settings
from pipeline.testkit import free_port, server_process

MIB = 1024 * 1024


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


class Peak:
    """The largest RSS seen while the block runs."""

    def __init__(self, pid: int):
        self.pid, self.value, self._stop = pid, 0.0, threading.Event()

    def __enter__(self) -> Peak:
        def sample() -> None:
            while not self._stop.is_set():
                self.value = max(self.value, rss_mib(self.pid))
                time.sleep(0.02)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def png_bomb(side: int = 6000) -> bytes:
    """A small PNG (about 100 KB) that declares side x side pixels, under the pixel limit."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (120, 100, 90)).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def noise_jpeg(limit: int) -> bytes:
    """A JPEG of noise just under `limit` bytes: the most pixels a file at the limit can hold."""
    rng = np.random.default_rng(0)
    side, previous = 1200, b""
    while True:
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
        if buffer.tell() > limit:
            return previous
        previous, side = buffer.getvalue(), side + 100


async def burst(url: str, files: list[tuple], concurrency: int) -> Counter:
    async with httpx.AsyncClient(timeout=600) as client:
        responses = await asyncio.gather(
            *(client.post(f"{url}/predict", files=files) for _ in range(concurrency))
        )
    return Counter(f"{r.status_code} {r.json().get('detail', '')[:60]}" for r in responses)


def raw_exchange(port: int, head: bytes, body_chunks: list[bytes], pause: float = 0.0) -> str:
    """Send a hand-made request (headers, then the body in chunks, `pause` seconds apart, until
    the server answers); the status line and start of the answer, or how the connection ended."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        try:
            s.sendall(head)
            for chunk in body_chunks:
                if select.select([s], [], [], pause)[0]:
                    break  # answered before the body was all sent
                s.sendall(chunk)
            answer = s.recv(4096).decode("latin-1")
        except (BrokenPipeError, ConnectionResetError) as e:
            return f"connection closed by the server ({type(e).__name__})"
    return answer.split("\r\n")[0] + " " + answer.split("\r\n\r\n", 1)[-1][:80]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--settle", type=float, default=60.0, help="seconds before settled RSS")
    # Smaller uploads for a smoke run (tests/test_bench.py): the cases' sizes dominate its time.
    parser.add_argument("--bomb-side", type=int, default=6000, help="the PNG's side, pixels")
    parser.add_argument("--header-mib", type=int, default=50, help="size of the huge header")
    parser.add_argument("--logs", type=Path, default=RESULTS / "logs", help="the server's log")
    parser.add_argument("--no-save", action="store_true", help="print only (tests)")
    args = parser.parse_args()
    settings = Settings()
    require_champion(settings)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    logs = args.logs
    logs.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pipeline.cli", "serve", "--port", str(port)]
    env = os.environ | {"MLFLOW_TRACKING_URI": settings.tracking_uri}
    bomb = png_bomb(args.bomb_side)
    noise = noise_jpeg(settings.max_file_bytes)
    rows = []
    with server_process(cmd, f"{url}/ready", env, logs / "abuse.log") as proc:
        idle = rss_mib(proc.pid)
        cases = [
            (
                f"{args.concurrency} requests x 1 PNG of {len(bomb) // 1024} KB declaring "
                f"{args.bomb_side}x{args.bomb_side} pixels",
                [("files", ("bomb.png", bomb, "image/png"))],
            ),
            (
                f"{args.concurrency} requests x {settings.max_files} noise JPEGs of "
                f"{len(noise) / MIB:.1f} MiB",
                [("files", (f"{i}.jpg", noise, "image/jpeg")) for i in range(settings.max_files)],
            ),
        ]
        for name, files in cases:
            with Peak(proc.pid) as peak:
                answers = asyncio.run(burst(url, files, args.concurrency))
            rows.append((name, dict(answers), f"{peak.value:.0f} MiB"))
        big_part = [b"x" * MIB] * 200
        head = (
            "POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
            f"boundary=b\r\nContent-Length: {200 * MIB}\r\n\r\n"
        ).encode()
        slow_head = (
            b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
            b"boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\nContent-Disposition: "
            b'form-data; name="files"; filename="slow.jpg"\r\n\r\n'
        )
        big = b"x" * (args.header_mib * MIB)
        huge_header = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + big
        for name, exchange in [
            ("one 200 MiB part (declared length)", lambda: raw_exchange(port, head, big_part)),
            (
                f"a {args.header_mib} MiB header",
                lambda: raw_exchange(port, huge_header + b"\r\n\r\n", []),
            ),
            (
                "a body sent 1 byte per 100 ms",
                lambda: raw_exchange(port, slow_head, [b"x"] * 1000, 0.1),
            ),
        ]:
            with Peak(proc.pid) as peak:
                start = time.perf_counter()
                answer = exchange()
            rows.append(
                (name, {answer: 1}, f"{peak.value:.0f} MiB, {time.perf_counter() - start:.1f} s")
            )
        ok = httpx.get(f"{url}/health").status_code
        time.sleep(args.settle)
        settled, high_water = rss_mib(proc.pid), rss_mib(proc.pid, "VmHWM")
    table = "\n".join(
        [
            f"faceopt serve at its default settings, {time.strftime('%Y-%m-%d %H:%M')}; "
            f"idle RSS {idle:.0f} MiB; high-water mark {high_water:.0f} MiB; "
            f"{args.settle:.0f} s after the last case {settled:.0f} MiB "
            f"({100 * (settled / idle - 1):+.0f}% of idle); /health afterwards: {ok}",
            "",
            "| case | answers (count) | peak RSS |",
            "| --- | --- | --- |",
            *(
                f"| {name} | {'; '.join(f'{a} ({n})' for a, n in answers.items())} | {peak} |"
                for name, answers, peak in rows
            ),
        ]
    )
    print(table)
    if not args.no_save:
        save("bench-abuse", table)


if __name__ == "__main__":
    main()
