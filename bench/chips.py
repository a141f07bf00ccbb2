"""How UTKFace's crops were cut, checked: each aligned crop is cut again with dlib's face-chip rule
and compared, as 48x48 grayscale, with the crop itself; and where the detection threshold sits
between those crops and scikit-image's pictures without people.

python -m bench.chips [--crops ../shared/data/utkface_sample]; the table goes to bench/results/.
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import dlib
import face_recognition_models
import numpy as np
from PIL import Image

from bench import save
from pipeline.data import dataset, faces, preprocess

PADDINGS = (0.15, 0.2, 0.25)
WITH_PEOPLE = {"astronaut.png", "camera.png"}  # scikit-image's bundled pictures of a person


def rechip_errors(files: list[Path], predictor: dlib.shape_predictor, padding: float) -> np.ndarray:
    """Mean absolute gray-level difference (48x48) between each crop and its re-cut chip."""
    errors = []
    for f in files:
        rgb = np.asarray(Image.open(f).convert("RGB"))
        box = faces.detect(Image.fromarray(rgb).convert("L"), 0.15)
        if box is None:
            continue
        chip = dlib.get_face_chip(rgb, predictor(rgb, box), size=faces.CHIP_SIZE, padding=padding)
        diff = preprocess.to_gray48(Image.fromarray(chip)).astype(float) - preprocess.load_gray48(f)
        errors.append(np.abs(diff).mean())
    return np.array(errors)


@functools.cache
def detector() -> dlib.fhog_object_detector:
    """dlib's face detector, made once: making one takes about 0.4 s, longer than it runs here."""
    return dlib.get_frontal_face_detector()


def best_score(image: Image.Image) -> float:
    """The highest face score the detector gives anywhere in `image` (at the service's scale)."""
    gray = image.convert("L")
    scale = min(1.0, faces.WINDOW / (0.15 * min(gray.size)))
    small = gray.resize((round(gray.width * scale), round(gray.height * scale)))
    _, scores, _ = detector().run(np.asarray(small), 0, -2.0)
    return max(scores, default=-2.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--crops", type=Path, default=Path("../shared/data/utkface_sample"))
    parser.add_argument("--no-save", action="store_true", help="print only (tests)")
    args = parser.parse_args()
    files = dataset.image_files(args.crops)
    models = {
        "68 landmarks": dlib.shape_predictor(
            face_recognition_models.pose_predictor_model_location()
        ),
        "5 landmarks": dlib.shape_predictor(
            face_recognition_models.pose_predictor_five_point_model_location()
        ),
    }
    lines = [
        f"# Re-cutting {len(files)} UTKFace crops of {args.crops} ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        "| landmarks | padding | crops found | median error | mean error (gray levels, 48x48) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, predictor in models.items():
        for padding in PADDINGS:
            errors = rechip_errors(files, predictor, padding)
            lines.append(
                f"| {name} | {padding} | {len(errors)} | {np.median(errors):.2f} | "
                f"{errors.mean():.2f} |"
            )
    from skimage import data as skdata

    root = Path(skdata.__file__).parent
    crops = [best_score(Image.open(f)) for f in files]
    pictures = {
        f.name: best_score(Image.open(f))
        for f in sorted(root.glob("*"))
        if f.suffix in (".png", ".jpg") and f.name not in WITH_PEOPLE
    }
    worst = max(pictures, key=pictures.get)
    lines += [
        "",
        f"Detection scores (threshold {faces.THRESHOLD}): the crops' lowest {min(crops):.2f}, "
        f"{sum(s > 0 for s in crops)} of {len(crops)} above 0; scikit-image's {len(pictures)} "
        f"pictures without people: highest {pictures[worst]:.2f} ({worst}).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_save:
        save("chips", text)


if __name__ == "__main__":
    main()
