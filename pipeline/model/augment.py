"""Batch augmentation of aligned faces, on the training device: flips, small shifts and tilts,
brightness and contrast. Inputs and outputs are model inputs (normalised), same shape and range."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.data import preprocess

# The model-input values of pixels 0 and 255: augmentation never leaves this range.
LOW = (0.0 - preprocess.MEAN) / preprocess.STD
HIGH = (1.0 - preprocess.MEAN) / preprocess.STD


@dataclass(frozen=True)
class Policy:
    """How strongly to augment; the zero policy leaves batches untouched."""

    flip: bool = False
    shift: float = 0.0  # most pixels moved along each axis
    rotate: float = 0.0  # most degrees turned either way
    jitter: float = 0.0  # most relative change of contrast, and of brightness (of the full range)

    @classmethod
    def from_params(cls, params: dict) -> Policy:
        return cls(
            flip=bool(params.get("flip", False)),
            shift=float(params.get("shift", 0)),
            rotate=float(params.get("rotate", 0.0)),
            jitter=float(params.get("jitter", 0.0)),
        )

    @property
    def active(self) -> bool:
        return self.flip or self.shift > 0 or self.rotate > 0 or self.jitter > 0


def _uniform(n: int, scale: float, like: torch.Tensor) -> torch.Tensor:
    """n draws from U(-scale, scale), one per image."""
    return (torch.rand(n, device=like.device, dtype=like.dtype) * 2 - 1) * scale


def augment(x: torch.Tensor, policy: Policy) -> torch.Tensor:
    """A randomly augmented copy of the N x 1 x H x W batch `x` (global torch RNG)."""
    if not policy.active:
        return x
    n, _, height, width = x.shape
    if policy.flip:
        mirrored = torch.rand(n, device=x.device) < 0.5
        x = torch.where(mirrored[:, None, None, None], x.flip(3), x)
    if policy.shift > 0 or policy.rotate > 0:
        # One affine warp per image (bilinear, border padding): a convex combination of input
        # pixels, so values stay in range. affine_grid works in [-1, 1] coordinates.
        angle = _uniform(n, math.radians(policy.rotate), x)
        cos, sin = torch.cos(angle), torch.sin(angle)
        tx, ty = _uniform(n, 2 * policy.shift / width, x), _uniform(n, 2 * policy.shift / height, x)
        theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if policy.jitter > 0:
        contrast = 1 + _uniform(n, policy.jitter, x)[:, None, None, None]
        brightness = _uniform(n, policy.jitter * (HIGH - LOW), x)[:, None, None, None]
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * contrast + mean + brightness).clamp(LOW, HIGH)
    return x
