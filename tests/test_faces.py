"""The service's face cut on real pictures that ship with scikit-image (no ../shared data needed)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from pipeline import faces, preprocess
from pipeline.config import Settings
from tests.conftest import astronaut_face

MIN_FACE = Settings().min_face
# scikit-image's bundled pictures without a person in them.
NO_PEOPLE = [
    "brick.png",
    "chelsea.png",
    "chessboard_GRAY.png",
    "chessboard_RGB.png",
    "clock_motion.png",
    "coffee.png",
    "coins.png",
    "color.png",
    "grass.png",
    "gravel.png",
    "horse.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "logo.png",
    "microaneurysms.png",
    "moon.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "page.png",
    "phantom.png",
    "retina.jpg",
    "rocket.jpg",
    "text.png",
    "cell.png",
]


def skimage_file(name: str) -> str:
    from skimage import data as skdata

    return os.path.join(os.path.dirname(skdata.__file__), name)


def lfw_subset() -> tuple[np.ndarray, np.ndarray]:
    """scikit-image's 100 LFW faces and 100 non-face patches, 25x25, scaled up to 200x200."""
    patches = np.load(skimage_file("lfw_subset.npy"))
    images = [
        Image.fromarray((p * 255).astype(np.uint8)).resize((200, 200), Image.BICUBIC)
        for p in patches
    ]
    return images[:100], images[100:]


def test_photos_without_a_face_get_no_answer() -> None:
    """The whole pictures, five crops of each, and LFW's non-face patches: at least 95% without
    an answer (measured: none of the 344 is answered)."""
    pictures = [Image.open(skimage_file(name)) for name in NO_PEOPLE]
    crops = []
    for picture in pictures:
        w, h = picture.size
        for box in [(0, 0, w // 2, h // 2), (w // 2, 0, w, h // 2), (0, h // 2, w // 2, h)]:
            crops.append(picture.crop(box))
        crops += [
            picture.crop((w // 2, h // 2, w, h)),
            picture.crop((w // 4, h // 4, w * 3 // 4, h * 3 // 4)),
        ]
    _, patches = lfw_subset()
    answered = [
        faces.face_from_image(image, MIN_FACE).answered for image in pictures + crops + patches
    ]
    assert len(answered) == 24 + 120 + 100
    assert np.mean(answered) <= 0.05


def test_faces_are_found_even_small_and_blurred() -> None:
    found, _ = lfw_subset()
    assert np.mean([faces.face_from_image(image, MIN_FACE).answered for image in found]) >= 0.9
    # The astronaut portrait: the face is 17% of the side, found at the default min_face.
    from skimage import data as skdata

    portrait = faces.face_from_image(Image.fromarray(skdata.astronaut()), MIN_FACE)
    assert portrait.answered and 160 < portrait.box[0] < 200 and 60 < portrait.box[1] < 100
    assert not faces.face_from_image(Image.fromarray(skdata.astronaut()), min_face=0.3).answered


def test_an_aligned_crop_comes_back_as_the_dataset_made_it() -> None:
    """Parity by construction: a UTKFace-framed crop is cut again into (nearly) the same face."""
    face = astronaut_face()
    cut = faces.face_from_image(face, MIN_FACE)
    assert cut.answered
    whole = preprocess.to_gray48(face).astype(float)
    assert np.abs(cut.pixels.astype(float) - whole).mean() < 3
    # A centre crop of the same photo (the rule that was replaced) is much further off.
    centre = preprocess.to_gray48(face.crop((16, 16, 184, 184))).astype(float)
    assert np.abs(centre - whole).mean() > 2 * np.abs(cut.pixels.astype(float) - whole).mean()


@pytest.mark.parametrize(
    ("raw", "error"),
    [(b"not an image", faces.ImageError), (b"\x89PNG\r\n\x1a\n" + b"\0" * 20, faces.ImageError)],
)
def test_unreadable_uploads(raw: bytes, error: type) -> None:
    with pytest.raises(error, match="not a readable image"):
        faces.open_image(raw, 10**6)
