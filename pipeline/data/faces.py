"""Uploaded photo -> the 48x48 face the dataset would have made of it, or no face.

UTKFace's aligned crops (the `.chip.jpg` files the CSV was made from) are dlib face chips: 68
landmarks, `get_face_chip(size=200, padding=0.2)`. Re-chipping the 299 sample crops that way gives
back the original to a median 2.5 gray levels in 48x48 (padding 0.15: 15, 0.25: 26); 5-landmark
chips are 15 off (python -m bench.chips). So the service does what the dataset did: dlib's HOG
detector finds the face, the 68-landmark model places it, and the chip is cut, rotated and scaled
exactly as UTKFace's were, then resized to 48x48 as the CSV was. A photo that is already such a
crop comes back nearly unchanged; a face inside a larger photo is cut twice (found, cut, then cut
again from that square as if it were the uploaded crop: recut) and comes out as UTKFace cut it.
"""

from __future__ import annotations

import io
import pickle
import threading
from dataclasses import dataclass

import dlib
import face_recognition_models
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.data import preprocess
from pipeline.errors import FaceoptError

CHIP_SIZE = 200  # UTKFace's crops
CHIP_PADDING = 0.2
# The HOG detector's window is 80x80 pixels: detection runs on a copy whose shorter side is
# WINDOW / min_face, so faces down to `min_face` of the photo's shorter side are found; a first,
# cheaper pass looks only for faces of at least COARSE (portraits, selfies, face crops).
WINDOW = 80
COARSE = 0.4
# Detection scores above this count as faces. Fitted on the 299 sample crops (rows of the CSV) and
# on scikit-image's 24 bundled pictures without people: at -0.4 every crop is found and none of
# those pictures (their highest: -0.56, the motorcycles); at 0 six crops are missed.
THRESHOLD = -0.4
# A cut within this share of the photo's side of its edges means the photo is already a crop.
ALREADY_CUT = 0.05
# Landmarks and the chip are taken from a copy in which the face is about this wide: large
# enough for a 200-pixel chip, small enough that a 12-megapixel photo costs no more than a small one.
WORK_FACE = 300
# The formats the service takes (Pillow's JPEG opener also takes phones' MPO files, JPEGs that
# hold a second picture). Nothing else reaches a decoder: each is attack surface (EPS would even
# start Ghostscript).
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
FORMAT_NAMES = "a JPEG, PNG, WebP, BMP or GIF image"
# JPEGs are decoded at 1/2, 1/4 or 1/8 scale when their shorter side stays at least this long:
# a face of the smallest size looked for (min_face 0.15) is still over 200 pixels, the chip's
# size, and a 48-megapixel photo costs a quarter of its memory and time.
DRAFT_SIDE = 1500
_local = threading.local()
_models_lock = threading.Lock()
_predictor: dlib.shape_predictor | None = None
_detector_pickle: bytes | None = None


class ImageError(FaceoptError, ValueError):
    """The upload is not an image we can read."""


class ImageTooLarge(ImageError):
    """More pixels than we decode (a decompression bomb, or just too big)."""


@dataclass(frozen=True)
class Face:
    """The 48x48 face, the detected box (None: no face found), and the region the chip was cut
    from: a square (x, y, side, side) turned by `angle` degrees about its centre; when asked
    for, also the 200x200 colour chip itself, as UTKFace's files hold it."""

    pixels: np.ndarray
    box: tuple[int, int, int, int] | None
    crop: tuple[int, int, int, int]
    angle: float = 0.0
    chip: np.ndarray | None = None

    @property
    def answered(self) -> bool:
        """The service labels found faces only: a photo without one gets no answer."""
        return self.box is not None


def decode(raw: bytes, max_pixels: int) -> tuple[Image.Image, float]:
    """The first frame, upright per EXIF, a large JPEG at a reduced scale, and the factor from
    its pixels to the photo's; pixel bombs and other formats are refused before decoding."""
    try:
        image = Image.open(io.BytesIO(raw), formats=FORMATS)
        side = max(image.size)
        if image.width * image.height > max_pixels:
            raise ImageTooLarge(
                f"image is {image.width}x{image.height} pixels, over the limit of {max_pixels} "
                "(FACEOPT_MAX_PIXELS)"
            )
        image.seek(0)  # GIF, WebP: the first frame
        if image.format in ("JPEG", "MPO"):
            image.draft(None, (DRAFT_SIDE, DRAFT_SIDE))
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # not a copy: a large photo is large
        return image, side / max(image.size)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # over Pillow's own limit, before its size is read
        raise ImageTooLarge(f"image has more pixels than the limit of {max_pixels}") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"not {FORMAT_NAMES} (unknown format or corrupt data)") from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageError(f"not a readable image ({e}); expected {FORMAT_NAMES}") from e


def _detector() -> dlib.fhog_object_detector:
    """One detector per thread: dlib's may not be used by two threads at once (the landmark
    model, 100 MB, may, and is shared). dlib makes its face detector by decompressing it, 0.45 s
    of CPU; every thread after the first gets a copy unpickled from the first, in 2 ms."""
    global _detector_pickle
    if not hasattr(_local, "detector"):
        with _models_lock:
            if _detector_pickle is None:
                _detector_pickle = pickle.dumps(dlib.get_frontal_face_detector())
        _local.detector = pickle.loads(_detector_pickle)
    return _local.detector


def landmark_model() -> dlib.shape_predictor:
    global _predictor
    with _models_lock:
        if _predictor is None:
            _predictor = dlib.shape_predictor(
                face_recognition_models.pose_predictor_model_location()
            )
    return _predictor


def _scaled(gray: Image.Image, scale: float) -> np.ndarray:
    if scale >= 1:
        return np.asarray(gray)
    size = (max(1, round(gray.width * scale)), max(1, round(gray.height * scale)))
    return np.asarray(gray.resize(size, Image.BILINEAR))


def detect(gray: Image.Image, min_face: float) -> dlib.rectangle | None:
    """The surest face (highest detection score) of at least `min_face` of the shorter side, in
    `gray`'s pixels, or None. The surest rather than the largest: a weak, large false detection
    (a patch on a spacesuit) must not win over the face."""
    short = min(gray.size)
    for smallest in sorted({max(COARSE, min_face), min_face}, reverse=True):
        scale = min(1.0, WINDOW / (smallest * short))
        found, scores, _ = _detector().run(_scaled(gray, scale), 0, THRESHOLD)
        if len(found):
            r = found[int(np.argmax(scores))]
            return dlib.rectangle(
                *(round(v / scale) for v in (r.left(), r.top(), r.right(), r.bottom()))
            )
    return None


def _box(r: dlib.rectangle | dlib.drectangle) -> tuple[int, int, int, int]:
    """(x, y, width, height); a dlib rectangle's right and bottom are inside it, hence +1."""
    return (
        round(r.left()),
        round(r.top()),
        round(r.right() - r.left() + 1),
        round(r.bottom() - r.top() + 1),
    )


@dataclass(frozen=True)
class Cut:
    """One cut of a face: 48x48 pixels, the square it was cut from, its turn in degrees, and the
    200x200 colour chip when a colour photo was given."""

    pixels: np.ndarray
    square: tuple[int, int, int, int]
    angle: float
    colour: np.ndarray | None = None


def chip(gray: Image.Image, box: dlib.rectangle, colour: Image.Image | None = None) -> Cut:
    """The UTKFace-style chip of the face in `box` as 48x48 pixels (and, from `colour`, the same
    photo in RGB, as a 200x200 colour chip), the square it was cut from (in `gray`'s pixels) and
    that square's turn in degrees."""
    scale = min(1.0, WORK_FACE / max(box.width(), 1))
    # Edge pixels repeated around the photo: where the chip reaches past it (a tight crop, a face
    # at the border) it gets the photo's own edge, not black (UTKFace cut from larger photos).
    margin = round(box.width() * scale / 2)
    work = np.pad(_scaled(gray, scale), margin, mode="edge")
    corners = (box.left(), box.top(), box.right(), box.bottom())
    shape = landmark_model()(work, dlib.rectangle(*(round(v * scale) + margin for v in corners)))
    pixels = dlib.get_face_chip(work, shape, size=CHIP_SIZE, padding=CHIP_PADDING)
    in_colour = None
    if colour is not None:  # the same cut of the RGB photo: the landmarks are the gray one's
        rgb = np.pad(_scaled(colour, scale), ((margin, margin), (margin, margin), (0, 0)), "edge")
        in_colour = dlib.get_face_chip(rgb, shape, size=CHIP_SIZE, padding=CHIP_PADDING)
    cut = dlib.get_face_chip_details(shape, size=CHIP_SIZE, padding=CHIP_PADDING)
    x, y, w, h = _box(cut.rect)
    square = (
        round((x - margin) / scale),
        round((y - margin) / scale),
        round(w / scale),
        round(h / scale),
    )
    pixels48 = preprocess.to_gray48(Image.fromarray(pixels))
    return Cut(pixels48, square, float(np.degrees(cut.angle)), in_colour)


def face_from_image(image: Image.Image, min_face: float, colour: bool = False) -> Face:
    """Grayscale, find the face and cut it as UTKFace did (with `colour`, also the colour chip);
    without a face, no answer (the centre square is kept only to show what was looked at)."""
    gray = image.convert("L")
    rgb = image.convert("RGB") if colour else None
    box = detect(gray, min_face)
    if box is None:
        side = min(gray.size)
        left, top = (gray.width - side) // 2, (gray.height - side) // 2
        square = gray.crop((left, top, left + side, top + side))
        return Face(preprocess.to_gray48(square), None, (left, top, side, side))
    cut = chip(gray, box, rgb)
    if not covers(cut.square, gray.size):
        cut = recut(gray, cut.square, rgb) or cut
    return Face(cut.pixels, _box(box), cut.square, cut.angle, cut.colour)


def covers(square: tuple[int, ...], size: tuple[int, int]) -> bool:
    """Whether the cut is the whole photo (within ALREADY_CUT of its side): the photo is already
    a crop of the dataset's kind, and cutting again would give the same."""
    x, y, side, _ = square
    edges = (x, y, x + side - size[0], y + side - size[1])
    return max(abs(e) for e in edges) <= ALREADY_CUT * side


def recut(
    gray: Image.Image, square: tuple[int, ...], colour: Image.Image | None = None
) -> Cut | None:
    """The face cut again from its first cut's square, brought to the dataset crops' size, as if
    that square were the uploaded photo; None when no face is found there. The first landmarks
    come from a box found at the detector's coarser scale for a small face, and are sometimes off;
    on a square framed like a UTKFace crop the detector and landmarks see what they saw on the
    crops themselves, so a face in a larger photo comes out as its crop would."""
    framed = _framed(gray, square)
    box = detect(framed, COARSE)
    if box is None:
        return None
    cut = chip(framed, box, _framed(colour, square) if colour is not None else None)
    x, y, side, _ = square
    ix, iy, iside, _ = cut.square
    scale = side / CHIP_SIZE
    back = round(iside * scale)
    square = (round(x + ix * scale), round(y + iy * scale), back, back)
    return Cut(cut.pixels, square, cut.angle, cut.colour)


def _framed(image: Image.Image, square: tuple[int, ...]) -> Image.Image:
    """The square of `image`, past its border its edge repeated (as chip() does, not black),
    at the dataset crops' size."""
    x, y, side, _ = square
    inside = image.crop(
        (max(x, 0), max(y, 0), min(x + side, image.width), min(y + side, image.height))
    )
    pad = [
        (max(-y, 0), max(y + side - image.height, 0)),
        (max(-x, 0), max(x + side - image.width, 0)),
    ] + [(0, 0)] * (len(image.getbands()) > 1)
    framed = Image.fromarray(np.pad(np.asarray(inside), pad, mode="edge"))
    if side != CHIP_SIZE:
        framed = framed.resize((CHIP_SIZE, CHIP_SIZE), Image.BILINEAR)
    return framed


def face_from_upload(raw: bytes, max_pixels: int, min_face: float, colour: bool = False) -> Face:
    """What the service does with one uploaded file: decode, find the face, cut it, 48x48 (and
    with `colour` the 200x200 colour chip). The boxes are in the uploaded photo's pixels, also
    when it was decoded at a reduced scale."""
    image, scale = decode(raw, max_pixels)
    face = face_from_image(image, min_face, colour)
    if scale == 1:
        return face

    def up(box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        return tuple(round(v * scale) for v in box)

    return Face(face.pixels, face.box and up(face.box), up(face.crop), face.angle, face.chip)
