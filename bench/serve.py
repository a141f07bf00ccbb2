"""`make bench-serve`: our service against `mlflow models serve` of the same registered version.

Both run as real server processes on this machine in the same run. Ours gets one 200x200 JPEG
per request (decode, face crop, network); MLflow's gets the already-preprocessed 48x48 input,
which favours it. Prints requests/s and p50/p99 latency at each concurrency, and the ratio; with
--samples, also the served champion's accuracy on a folder of labelled UTKFace JPEGs over HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from pipeline import data, labels, preprocess
from pipeline.config import Settings

RESULTS = Path(__file__).parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def process(cmd: list[str], ready_url: str, env: dict, log: Path):
    """A server process for the duration of the block, once `ready_url` answers 200."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"{cmd[:4]} exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            raise SystemExit(f"{cmd[:4]} not ready in 180 s: {log.read_text()[-2000:]}")
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def load(
    send: Callable[[httpx.AsyncClient], object], concurrency: int, requests: int
) -> dict:
    """`requests` requests from `concurrency` workers; latency of each, throughput of all."""
    latencies: list[float] = []
    counter = iter(range(requests))

    async def worker(client: httpx.AsyncClient) -> None:
        for _ in counter:
            start = time.perf_counter()
            response = await send(client)
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await send(client)  # warm-up
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    latencies.sort()
    return {
        "rps": len(latencies) / wall,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
    }


def jpeg_200(path: Path | None) -> bytes:
    """One 200x200 JPEG: a real face when a sample folder is given, else a synthetic one."""
    if path:
        return path.read_bytes()
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def accuracy(url: str, samples: Path, edges: tuple[int, ...]) -> dict[str, float]:
    """Per-head accuracy of the served model on UTKFace JPEGs (labels from the file names)."""
    files = sorted(samples.glob("*.jpg"))
    names = labels.class_names(edges)
    hits = {head: 0 for head in labels.HEADS}
    detected = 0
    with httpx.Client(base_url=url, timeout=120) as client:
        for start in range(0, len(files), 16):
            batch = files[start : start + 16]
            r = client.post("/predict", files=[("files", (f.name, f.read_bytes())) for f in batch])
            r.raise_for_status()
            for f, p in zip(batch, r.json()["predictions"], strict=True):
                age, gender, race = data._utk_labels(f.name)
                truth = {
                    "age": names["age"][int(labels.age_bracket(np.array([age]), edges)[0])],
                    "ethnicity": names["ethnicity"][race],
                    "gender": names["gender"][gender],
                }
                detected += p["face_detected"]
                for head in labels.HEADS:
                    hits[head] += p[head]["label"] == truth[head]
    out = {head: hits[head] / len(files) for head in labels.HEADS}
    return out | {"images": len(files), "faces_detected": detected / len(files)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=Path, default=Path("../shared/data/utkface_sample"))
    parser.add_argument("--requests", type=int, default=200, help="requests per concurrency level")
    parser.add_argument("--concurrency", default="1,8,32")
    args = parser.parse_args()
    settings = Settings()
    samples = args.samples if args.samples.is_dir() else None
    photo = jpeg_200(next(iter(sorted(samples.glob("*.jpg")))) if samples else None)
    face = preprocess.face_from_image(preprocess.open_image(photo, settings.max_pixels)).pixels
    mlflow_body = json.dumps({"inputs": face[None].tolist()})
    # mlflow models serve execs `uvicorn` by name: the venv's bin must be on PATH.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = os.environ | {"MLFLOW_TRACKING_URI": settings.tracking_uri, "PATH": path}
    ours, theirs = free_port(), free_port()
    levels = [int(c) for c in args.concurrency.split(",")]
    rows, served = [], {}
    tmp = RESULTS / "logs"
    tmp.mkdir(parents=True, exist_ok=True)
    ours_cmd = [sys.executable, "-m", "pipeline.cli", "serve", "--port", str(ours)]
    with process(ours_cmd, f"http://127.0.0.1:{ours}/ready", env, tmp / "ours.log"):
        if samples:
            served = accuracy(f"http://127.0.0.1:{ours}", samples, settings.age_edges)
        for c in levels:
            rows.append(
                (
                    "faceopt /predict (JPEG)",
                    c,
                    asyncio.run(
                        load(
                            lambda cl: cl.post(
                                f"http://127.0.0.1:{ours}/predict",
                                files=[("files", ("face.jpg", photo, "image/jpeg"))],
                            ),
                            c,
                            args.requests,
                        )
                    ),
                )
            )
    model_uri = f"models:/{settings.model_name}@{settings.alias}"
    theirs_cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        model_uri,
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(theirs),
    ]
    with process(theirs_cmd, f"http://127.0.0.1:{theirs}/ping", env, tmp / "mlflow.log"):
        for c in levels:
            rows.append(
                (
                    "mlflow models serve (48x48 JSON)",
                    c,
                    asyncio.run(
                        load(
                            lambda cl: cl.post(
                                f"http://127.0.0.1:{theirs}/invocations",
                                content=mlflow_body,
                                headers={"Content-Type": "application/json"},
                            ),
                            c,
                            args.requests,
                        )
                    ),
                )
            )
    report(rows, levels, served, model_uri)


def report(rows: list, levels: list[int], served: dict, model_uri: str) -> None:
    lines = [
        f"model: {model_uri}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        "| server | concurrency | requests/s | p50 ms | p99 ms |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {name} | {c} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |"
        for name, c, r in rows
    ]
    by = {(name.split()[0], c): r["rps"] for name, c, r in rows}
    lines += ["", "| concurrency | faceopt / mlflow requests/s |", "| --- | --- |"]
    lines += [f"| {c} | {by[('faceopt', c)] / by[('mlflow', c)]:.2f}x |" for c in levels]
    if served:
        lines += [
            "",
            f"served accuracy on {served['images']} UTKFace sample JPEGs over HTTP "
            f"(faces detected in {served['faces_detected']:.0%}): "
            + ", ".join(f"{h} {served[h]:.1%}" for h in labels.HEADS),
        ]
    text = "\n".join(lines)
    print(text)
    out = RESULTS / f"bench-serve-{time.strftime('%Y%m%d-%H%M%S')}.md"
    out.write_text(text + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
