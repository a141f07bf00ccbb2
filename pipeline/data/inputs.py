"""What a network eats: one small description (size, colour, features, normalisation), and the one
function from a face chip to that input, shared by data loading, training, the pyfunc, evaluate
and the service.

The seed's form is the Kaggle CSV's: a 48x48 grayscale face. A UTKFace folder holds the 200x200
colour chips those rows were made from, so a model trained on one can also see the face in colour,
at another size, and through pretrained face features of the same chip (pipeline.data.descriptor).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal

import numpy as np
import torch
from PIL import Image

from pipeline.data import descriptor, preprocess

Colour = Literal["gray", "rgb"]
Features = Literal["pixels", "descriptor", "both"]
FEATURES: tuple[str, ...] = ("pixels", "descriptor", "both")
MODES = {"gray": "L", "rgb": "RGB"}
# dlib's descriptors have unit length (128 components of about 0.09 spread): scaled to a spread
# of about 1, as the pixels are, so one learning rate suits both branches of a fused network.
# ("dlib-stages" features differ in scale from one component to the next: the network normalises
# them itself, see pipeline.model.network.)
DESCRIPTOR_SCALE = 10.0


@dataclass(frozen=True)
class InputSpec:
    """The form of a network's input: pixels at `size` in `colour`, pretrained face features of
    `descriptor_kind` (descriptor.KINDS), or both."""

    size: int = preprocess.SIZE
    colour: Colour = "gray"
    features: Features = "pixels"
    mean: float = preprocess.MEAN
    std: float = preprocess.STD
    descriptor_scale: float = DESCRIPTOR_SCALE
    descriptor_kind: str = descriptor.KIND

    def __post_init__(self) -> None:
        if self.colour not in MODES:
            raise ValueError(f"colour {self.colour!r}; expected gray or rgb")
        if self.features not in FEATURES:
            raise ValueError(f"features {self.features!r}; expected one of {FEATURES}")
        if not 16 <= self.size <= 200:
            raise ValueError(f"input size {self.size}; expected 16..200 pixels")
        descriptor.dim(self.descriptor_kind)  # a known kind
        if not self.descriptor:  # one pixels-only form, whatever kind it was given
            object.__setattr__(self, "descriptor_kind", descriptor.KIND)

    @property
    def descriptor_dim(self) -> int:
        return descriptor.dim(self.descriptor_kind)

    @property
    def channels(self) -> int:
        return 3 if self.colour == "rgb" else 1

    @property
    def pixels(self) -> bool:
        return self.features != "descriptor"

    @property
    def descriptor(self) -> bool:
        return self.features != "pixels"

    @property
    def takes_chips(self) -> bool:
        """Whether the model is given the 200x200 colour chip (and derives its input from it);
        the seed's form is given the 48x48 grayscale face itself, as the CSV holds it."""
        return (self.size, self.colour, self.features) != (preprocess.SIZE, "gray", "pixels")

    def with_features(self, features: str) -> InputSpec:
        return replace(self, features=features)

    def to_meta(self) -> dict:
        return asdict(self) | {"mode": MODES[self.colour]}

    @classmethod
    def from_meta(cls, meta: dict) -> InputSpec:
        """From a version's meta.json "input"; versions before colour and features held only
        size, mode ("L"), mean and std, and those before descriptor kinds ate dlib's 128-D one."""
        colour = {"L": "gray", "RGB": "rgb"}[meta.get("mode", "L")]
        return cls(
            size=int(meta.get("size", preprocess.SIZE)),
            colour=colour,
            features=meta.get("features", "pixels"),
            mean=float(meta.get("mean", preprocess.MEAN)),
            std=float(meta.get("std", preprocess.STD)),
            descriptor_scale=float(meta.get("descriptor_scale", DESCRIPTOR_SCALE)),
            descriptor_kind=meta.get("descriptor_kind", "dlib128"),
        )


SEED_FORM = InputSpec()  # the Kaggle CSV's 48x48 grayscale face


def to_pixels(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """uint8 size x size (gray) or size x size x 3 (rgb), resized as the Kaggle CSV was made
    (Pillow, bilinear); for the seed's form exactly preprocess.to_gray48."""
    converted = image.convert(MODES[spec.colour])
    return np.asarray(converted.resize((spec.size, spec.size), Image.BILINEAR), dtype=np.uint8)


def chips_to_pixels(chips: np.ndarray, spec: InputSpec) -> np.ndarray:
    """N chips (uint8 N x H x W x 3 RGB) -> N faces in the spec's pixels."""
    return np.stack([to_pixels(Image.fromarray(chip), spec) for chip in chips])


def pixel_tensor(images: np.ndarray | torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """uint8 N x S x S (gray) or N x S x S x 3 (rgb) -> float32 N x C x S x S, normalised by the
    spec's constants (fixed, not dataset statistics, so a version needs no extra state)."""
    x = torch.as_tensor(_writable(images))
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return (x.float() / 255.0 - spec.mean) / spec.std


def descriptor_tensor(descriptors: np.ndarray | torch.Tensor, spec: InputSpec) -> torch.Tensor:
    return torch.as_tensor(_writable(descriptors), dtype=torch.float32) * spec.descriptor_scale


def _writable(a: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """torch warns on read-only arrays (a decoded image's view); those are copied."""
    return a.copy() if isinstance(a, np.ndarray) and not a.flags.writeable else a
