"""Uploads -> faces with bounded memory: a few images decoded at once across all requests, each
read from its spooled upload only when its turn comes and dropped once its 48x48 face is cut."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

from fastapi import HTTPException

from pipeline.config import Settings
from pipeline.data import faces as face_crop

TRIM_EVERY = 1.0  # seconds: at most one heap trim a second


def _malloc_trim() -> ctypes._CFuncPtr | None:
    """glibc's malloc_trim, which hands freed heap back to the system; None elsewhere."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


class DecodePool:
    """`n` threads that read, decode and cut every upload, for all requests together. Memory for
    decoded photos is bounded by `n`, and with glibc it lives in those threads' malloc arenas
    only (decoding in the request threads spread it over one arena per thread: 3.5 GiB for 16
    concurrent 6000x6000 PNGs, although at most 2 were decoded at once). When the pool goes idle,
    freed memory is handed back to the system, which glibc would otherwise keep for reuse."""

    def __init__(self, n: int):
        self._pool = ThreadPoolExecutor(n, thread_name_prefix="decode")
        self._lock = threading.Lock()
        self._busy = 0
        self._trimmed = 0.0
        self._trim = _malloc_trim()

    async def face(
        self, file: BinaryIO, name: str, settings: Settings, colour: bool = False
    ) -> face_crop.Face:
        future = self._pool.submit(self._cut, file, name, settings, colour)
        return await asyncio.wrap_future(future)

    def _cut(self, file: BinaryIO, name: str, settings: Settings, colour: bool) -> face_crop.Face:
        with self._lock:
            self._busy += 1
        try:
            return cut_face(file, name, settings, colour)
        finally:
            with self._lock:
                self._busy -= 1
                idle = self._busy == 0
            now = time.monotonic()
            if idle and self._trim is not None and now - self._trimmed > TRIM_EVERY:
                self._trimmed = now
                self._trim(0)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def read_limited(file: BinaryIO, name: str, limit: int) -> bytes:
    raw = file.read(limit + 1)  # one byte past the limit is enough to know
    if len(raw) > limit:
        raise HTTPException(
            413, f"{name}: larger than the limit of {limit} bytes (FACEOPT_MAX_FILE_BYTES)"
        )
    if not raw:
        raise HTTPException(422, f"{name}: empty file")
    return raw


def cut_face(file: BinaryIO, name: str, settings: Settings, colour: bool = False) -> face_crop.Face:
    """One upload's face (with `colour`, also its colour chip); its bytes and the decoded photo
    are dropped when this returns."""
    raw = read_limited(file, name, settings.max_file_bytes)
    try:
        return face_crop.face_from_upload(raw, settings.max_pixels, settings.min_face, colour)
    except face_crop.ImageTooLarge as e:
        raise HTTPException(413, f"{name}: {e}") from e
    except face_crop.ImageError as e:
        raise HTTPException(415, f"{name}: {e}") from e
