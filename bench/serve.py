"""`make bench-serve`: our service against `mlflow models serve` of the same registered version.

Both run as real server processes on this machine in the same run. Ours gets one 200x200 JPEG
per request (decode, face crop, network); MLflow's gets the already-preprocessed input (the 48x48
face, or the colour chip of a version that takes chips), which favours it. Prints requests/s and
p50/p99 latency at each concurrency, and the ratio; with --samples, also the served champion's
accuracy on a folder of labelled UTKFace JPEGs over HTTP. With --baseline (another tracking
store, e.g. one whose champion is a 48x48 grayscale version), our service serves that store's
champion too, with the same requests, and the ratio of the two is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench import RESULTS, require_champion, save
from pipeline import evaluate
from pipeline.config import Settings
from pipeline.data import dataset, faces, labels
from pipeline.storage import redact
from pipeline.testkit import free_port, machine, server_process


def raw_request(request: httpx.Request) -> bytes:
    """The request as HTTP/1.1 bytes on a keep-alive connection, encoded once (httpx builds the
    multipart or JSON body and its headers)."""
    body = request.read()
    headers = {k: v for k, v in request.headers.items() if k.lower() not in ("connection",)}
    lines = [f"{request.method} {request.url.raw_path.decode()} HTTP/1.1"]
    lines += [f"{k}: {v}" for k, v in headers.items()] + ["Connection: keep-alive", "", ""]
    return "\r\n".join(lines).encode() + body


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes) -> int:
    """Send one request, read its whole response; the status code."""
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            await reader.readexactly(int(value))
            return status
    raise RuntimeError(f"response without Content-Length: {head[:200]!r}")


async def load(request: httpx.Request, concurrency: int, requests: int) -> dict:
    """`requests` requests over `concurrency` keep-alive connections; latency of each and the
    throughput of all. Like wrk, the generator sends pre-encoded bytes and only reads responses,
    so it takes little of the cores it shares with the server (httpx took 2-3 ms a request)."""
    raw = raw_request(request)
    latencies: list[float] = []
    counter = iter(range(requests))

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(request.url.host, request.url.port)
        if (status := await _exchange(reader, writer, raw)) != 200:  # warm-up, not timed
            raise RuntimeError(f"{request.url}: warm-up request answered {status}")
        return reader, writer

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in counter:
            start = time.perf_counter()
            if (status := await _exchange(reader, writer, raw)) != 200:
                raise RuntimeError(f"{request.url} answered {status}")
            latencies.append(time.perf_counter() - start)

    connections = await asyncio.gather(*(connect() for _ in range(concurrency)))
    try:
        start = time.perf_counter()
        await asyncio.gather(*(worker(*c) for c in connections))
        wall = time.perf_counter() - start
    finally:
        for _, writer in connections:
            writer.close()
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


def accuracy(url: str, samples: Path, edges: tuple[int, ...], scale: float = 1.0) -> dict:
    """Per-head accuracy of the served model on UTKFace JPEGs (labels from the file names), as
    they are (scale 1) or each inside a photo `scale` times its size."""
    files = sorted(samples.glob("*.jpg"))
    names = labels.class_names(edges)
    hits = {head: 0 for head in labels.HEADS}
    detected = 0
    with httpx.Client(base_url=url, timeout=120) as client:
        for start in range(0, len(files), 16):
            batch = files[start : start + 16]
            raws = [f.read_bytes() for f in batch]
            if scale != 1:
                raws = [evaluate.in_a_photo(raw, scale) for raw in raws]
            r = client.post(
                "/predict",
                files=[("files", (f.name, raw)) for f, raw in zip(batch, raws, strict=True)],
            )
            r.raise_for_status()
            for f, p in zip(batch, r.json()["predictions"], strict=True):
                age, gender, race = dataset.utk_labels(f.name)
                truth = {
                    "age": names["age"][int(labels.age_bracket(np.array([age]), edges)[0])],
                    "ethnicity": names["ethnicity"][race],
                    "gender": names["gender"][gender],
                }
                detected += p["face_detected"]
                for head in labels.HEADS:  # no face found: no answer, counted as wrong
                    hits[head] += p[head] is not None and p[head]["label"] == truth[head]
    out = {head: hits[head] / len(files) for head in labels.HEADS}
    return out | {"images": len(files), "faces_detected": detected / len(files), "scale": scale}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=Path, default=Path("../shared/data/utkface_sample"))
    parser.add_argument("--requests", type=int, default=1000, help="requests per concurrency level")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--baseline", help="tracking URI of a store whose champion to compare")
    parser.add_argument("--logs", type=Path, default=RESULTS / "logs", help="the servers' logs")
    parser.add_argument("--no-save", action="store_true", help="print only (tests)")
    args = parser.parse_args()
    settings = Settings()
    require_champion(settings)
    samples = args.samples if args.samples.is_dir() else None
    photo = jpeg_200(next(iter(sorted(samples.glob("*.jpg")))) if samples else None)
    cut = faces.face_from_upload(photo, settings.max_pixels, settings.min_face, colour=True)
    _, model = evaluate.resolve(settings, settings.alias)
    face = cut.chip if getattr(model, "takes_chips", False) else cut.pixels
    what = "colour chip" if getattr(model, "takes_chips", False) else "48x48"
    mlflow_body = json.dumps({"inputs": face[None].tolist()})
    # mlflow models serve execs `uvicorn` by name: the venv's bin must be on PATH.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = os.environ | {"MLFLOW_TRACKING_URI": settings.tracking_uri, "PATH": path}
    ours, theirs = free_port(), free_port()
    levels = [int(c) for c in args.concurrency.split(",")]
    rows, served = [], []
    tmp = args.logs
    tmp.mkdir(parents=True, exist_ok=True)

    def measure(name: str, request: httpx.Request) -> None:
        for c in levels:
            rows.append((name, c, asyncio.run(load(request, c, args.requests))))

    ours_cmd = [sys.executable, "-m", "pipeline.cli", "serve", "--port", str(ours)]
    with server_process(ours_cmd, f"http://127.0.0.1:{ours}/ready", env, tmp / "ours.log"):
        if samples:
            served = [
                accuracy(f"http://127.0.0.1:{ours}", samples, settings.age_edges, scale)
                for scale in (1.0, 2.0)
            ]
        files = [("files", ("face.jpg", photo, "image/jpeg"))]
        predict = httpx.Request("POST", f"http://127.0.0.1:{ours}/predict", files=files)
        measure("faceopt /predict (JPEG)", predict)
    if args.baseline:
        baseline_env = env | {"MLFLOW_TRACKING_URI": args.baseline}
        log = tmp / "baseline.log"
        with server_process(ours_cmd, f"http://127.0.0.1:{ours}/ready", baseline_env, log):
            measure(f"baseline /predict (JPEG; {redact(args.baseline)})", predict)
    model_uri = f"models:/{settings.model_name}@{settings.alias}"
    theirs_cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri]
    theirs_cmd += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(theirs)]
    with server_process(theirs_cmd, f"http://127.0.0.1:{theirs}/ping", env, tmp / "mlflow.log"):
        measure(
            f"mlflow models serve ({what} JSON)",
            httpx.Request(
                "POST",
                f"http://127.0.0.1:{theirs}/invocations",
                content=mlflow_body,
                headers={"Content-Type": "application/json"},
            ),
        )
    text = report(rows, levels, served, model_uri)
    print(text)
    if not args.no_save:
        save("bench-serve", text)


def report(rows: list, levels: list[int], served: list[dict], model_uri: str) -> str:
    """The markdown tables of the measurements."""
    lines = [
        f"model: {model_uri}, {machine()}, {time.strftime('%Y-%m-%d %H:%M')}",
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
    if any(("baseline", c) in by for c in levels):
        lines += ["", "| concurrency | faceopt / baseline requests/s |", "| --- | --- |"]
        lines += [f"| {c} | {by[('faceopt', c)] / by[('baseline', c)]:.2f} |" for c in levels]
    for acc in served:
        where = (
            "as they are" if acc["scale"] == 1 else f"each in a photo {acc['scale']:g}x its size"
        )
        lines += [
            "",
            f"served accuracy on {acc['images']} UTKFace sample JPEGs over HTTP, {where} "
            f"(faces detected in {acc['faces_detected']:.0%}): "
            + ", ".join(f"{h} {acc[h]:.1%}" for h in labels.HEADS),
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
