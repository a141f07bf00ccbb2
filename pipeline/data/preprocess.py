"""Image -> model input: what the network sees, for training and serving (photos are cut to faces
first, in pipeline.data.faces)."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

SIZE = 48
# Fixed constants rather than dataset statistics, so a logged model needs no extra state:
# the faces average about 0.49 with a spread of about 0.25 after scaling to [0, 1].
MEAN = 0.5
STD = 0.25


def to_gray48(image: Image.Image) -> np.ndarray:
    """Grayscale 48x48 uint8, resized exactly as the Kaggle CSV was made (Pillow, bilinear)."""
    return np.asarray(image.convert("L").resize((SIZE, SIZE), Image.BILINEAR), dtype=np.uint8)


def load_gray48(source: str | Path | BinaryIO) -> np.ndarray:
    with Image.open(source) as image:
        return to_gray48(image)


def to_model_input(
    images: np.ndarray | torch.Tensor, mean: float = MEAN, std: float = STD
) -> torch.Tensor:
    """uint8 N x 48 x 48 -> float32 N x 1 x 48 x 48, normalised."""
    x = torch.as_tensor(images)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    return (x.float() / 255.0 - mean) / std
