"""`faceopt evaluate`: what the service answers for photos, for one registered version, next to the
same model on the same photos converted as the dataset was (the parity gap). No server is started
and nothing is posted: each photo goes through the service's own preprocessing function."""

from __future__ import annotations

import io
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from PIL import Image, ImageFilter
from tqdm.auto import tqdm

from pipeline import storage
from pipeline.config import Settings
from pipeline.data import dataset, descriptor, faces, labels, preprocess
from pipeline.errors import FaceoptError
from pipeline.tracking import runs
from pipeline.training import metrics

SURROUNDS = ("blur", "mean")
NO_ANSWER = -1  # the prediction recorded for a photo the service gives no labels for


class EvaluateError(FaceoptError, ValueError):
    """The photos or the version cannot be evaluated as asked."""


@dataclass(frozen=True)
class Photos:
    """UTKFace-named photos: file names, encoded bytes, and the labels in the names."""

    names: list[str]
    raws: list[bytes]
    age: np.ndarray
    ethnicity: np.ndarray
    gender: np.ndarray

    def truth(self, edges: tuple[int, ...]) -> dict[str, np.ndarray]:
        return labels.targets(self.age, self.ethnicity, self.gender, edges)


def read_photos(folder: Path) -> Photos:
    """Every image in `folder` named <age>_<gender>_<race>_<datetime>.jpg; a bad name is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvaluateError(f"{folder}: not a folder of photos")
    files = dataset.image_files(folder)
    if not files:
        raise EvaluateError(
            f"{folder}: no .jpg/.jpeg/.png files; expected photos named like UTKFace's "
            "<age>_<gender>_<race>_<datetime>.jpg"
        )
    found = []
    for f in files:
        parsed = dataset.utk_labels(f.name)
        if isinstance(parsed, str):
            raise EvaluateError(f"{f}: {parsed}")
        found.append(parsed)
    age, gender, race = (np.array(column) for column in zip(*found, strict=True))
    return Photos([f.name for f in files], [f.read_bytes() for f in files], age, race, gender)


def in_a_photo(raw: bytes, scale: float, surround: str = "blur") -> bytes:
    """The photo in the middle of one `scale` times its size, as a JPEG. Surroundings: the mean
    colour of its border (mean), or (blur, as bench-serve has it) that canvas with the photo on it
    blurred, the sharp photo blended back in with a soft edge."""
    if surround not in SURROUNDS:
        raise EvaluateError(f"unknown surround {surround!r}; expected one of {SURROUNDS}")
    with Image.open(io.BytesIO(raw)) as opened:
        face = opened.convert("RGB")
    w, h = face.size
    pixels = np.asarray(face, dtype=np.float64)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]).mean(axis=0)
    photo = Image.new("RGB", (round(w * scale), round(h * scale)), tuple(int(v) for v in border))
    at = ((photo.width - w) // 2, (photo.height - h) // 2)
    photo.paste(face, at)
    if surround == "blur":
        blurred = photo.filter(ImageFilter.GaussianBlur(w / 16))
        mask = Image.new("L", photo.size, 0)
        inner = (at[0] + w // 20, at[1] + h // 20, at[0] + w * 19 // 20, at[1] + h * 19 // 20)
        mask.paste(255, inner)
        photo = Image.composite(photo, blurred, mask.filter(ImageFilter.GaussianBlur(w / 32)))
    out = io.BytesIO()
    photo.save(out, format="JPEG", quality=95)
    return out.getvalue()


def dataset_faces(photos: Photos, chips: bool = False) -> np.ndarray:
    """The photos converted as the dataset was: whole photo, grayscale, bilinear 48x48; for a
    version that takes chips, the whole photo as its colour chip (a UTKFace photo is one)."""
    if chips:
        return np.stack([descriptor.read_chip(io.BytesIO(raw)) for raw in photos.raws])
    return np.stack([preprocess.load_gray48(io.BytesIO(raw)) for raw in photos.raws])


def served_faces(
    raws: list[bytes], settings: Settings, desc: str, colour: bool = False
) -> list[faces.Face]:
    """Each photo through the service's preprocessing, with the service's settings."""
    return [
        faces.face_from_upload(raw, settings.max_pixels, settings.min_face, colour)
        for raw in tqdm(raws, desc=desc, unit="photo", leave=False)
    ]


def served_inputs(cut: list[faces.Face], chips: bool) -> np.ndarray:
    """What the service gives the version for each cut (zeros where no face was found, which
    gets no answer)."""
    if not chips:
        return np.stack([f.pixels for f in cut])
    blank = np.zeros((faces.CHIP_SIZE, faces.CHIP_SIZE, 3), dtype=np.uint8)
    return np.stack([f.chip if f.chip is not None else blank for f in cut])


def predict(model, pixels: np.ndarray, answered: np.ndarray) -> dict[str, np.ndarray]:
    """Class per head; NO_ANSWER where the service gives no labels."""
    probs = model.probabilities(pixels)
    return {head: np.where(answered, p.argmax(1), NO_ANSWER) for head, p in probs.items()}


def scores(pred: dict[str, np.ndarray], truth: dict[str, np.ndarray]) -> dict[str, float]:
    """Accuracy and macro-F1 per head over all photos; a photo without an answer counts as wrong."""
    out = {}
    for head in labels.HEADS:
        out[f"{head}_acc"] = float((pred[head] == truth[head]).mean())
        classes = np.unique(truth[head])  # macro over the true classes; no answer is no class
        out[f"{head}_f1"] = metrics.macro_f1(truth[head], pred[head], classes)
    return out


def intervals(
    served: dict[str, np.ndarray], converted: dict[str, np.ndarray], truth: dict[str, np.ndarray]
) -> dict[str, float]:
    """95% bootstrap intervals of each head's served accuracy and of its gap to the dataset's
    conversion (paired: the same resampled photos for both)."""
    per_photo = {}
    for head in labels.HEADS:
        right = served[head] == truth[head]
        per_photo[f"{head}_acc"] = right
        per_photo[f"{head}_gap"] = right.astype(np.int8) - (converted[head] == truth[head])
    out = {}
    for key, (low, high) in metrics.bootstrap(per_photo).items():
        out[f"{key}_low"], out[f"{key}_high"] = low, high
    return out


def resolve(settings: Settings, version: str):
    """(registered version, its FaceModel) for an alias such as champion, or a version number."""
    client = runs.client_for(settings.tracking_uri)
    name = settings.model_name
    try:
        found = (
            client.get_model_version(name, version)
            if version.isdigit()
            else client.get_model_version_by_alias(name, version)
        )
    except mlflow.exceptions.MlflowException as e:
        raise EvaluateError(
            f"no version {version!r} of model {name!r} in {storage.redact(settings.tracking_uri)}: run "
            "`make train-best` first, or pass VERSION=<alias or number> of a registered one"
        ) from e
    mlflow.set_tracking_uri(settings.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{name}/{found.version}").unwrap_python_model()
    return found, model


@dataclass(frozen=True)
class Evaluation:
    """One version on a folder of photos: the dataset conversion's metrics (<head>_acc, ...) and,
    per context, the served ones (context, found, preprocess_ms, served_<head>_acc, ...), named as
    they are logged."""

    model: str
    version: str
    run_id: str
    folder: str
    photos: int
    surround: str
    min_face: float
    dataset: dict[str, float]
    contexts: list[dict[str, float]]


def run(
    settings: Settings,
    folder: Path,
    version: str = "champion",
    contexts: tuple[float, ...] = (1.0,),
    surround: str = "blur",
) -> Evaluation:
    """The parity table of one version on a folder of photos, logged to the version's run."""
    photos = read_photos(folder)
    found, model = resolve(settings, version)
    edges = tuple(model.meta["age_edges"])
    truth = photos.truth(edges)
    everyone = np.ones(len(photos.names), dtype=bool)
    chips = getattr(model, "takes_chips", False)
    converted = predict(model, dataset_faces(photos, chips), everyone)
    reference = scores(converted, truth)
    rows = []
    for context in contexts:
        raws = (
            photos.raws if context == 1 else [in_a_photo(r, context, surround) for r in photos.raws]
        )
        started = time.perf_counter()
        cut = served_faces(raws, settings, f"context {context:g}", chips)
        ms = 1000 * (time.perf_counter() - started) / len(raws)
        answered = np.array([f.answered for f in cut])  # a face was found
        pred = predict(model, served_inputs(cut, chips), answered)
        served = scores(pred, truth) | intervals(pred, converted, truth)
        rows.append(
            {
                "context": context,
                "found": float(answered.mean()),
                "preprocess_ms": ms,
                **{f"served_{k}": v for k, v in served.items()},
            }
        )
    result = Evaluation(
        model=settings.model_name,
        version=str(found.version),
        run_id=found.run_id,
        folder=str(folder),
        photos=len(photos.names),
        surround=surround,
        min_face=settings.min_face,
        dataset=reference,
        contexts=rows,
    )
    log_result(settings, result)
    return result


def table(result: Evaluation) -> str:
    """Markdown: per context and head, the service's accuracy, the dataset conversion's, the gap."""
    lines = [
        f"{result.model} v{result.version} on {result.photos} photos in "
        f"{result.folder} (surroundings: {result.surround}, min_face {result.min_face})",
        "",
        "| context | faces found | head | served acc [95%] | dataset acc | gap (points) [95%] "
        "| served F1 | dataset F1 | preprocess ms/photo |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    ref = result.dataset
    for row in result.contexts:
        for head in labels.HEADS:
            served, dataset = row[f"served_{head}_acc"], ref[f"{head}_acc"]
            low, high = (100 * row[f"served_{head}_acc_{end}"] for end in ("low", "high"))
            gap_low, gap_high = (100 * row[f"served_{head}_gap_{end}"] for end in ("low", "high"))
            lines.append(
                f"| {row['context']:g}x | {row['found']:.1%} | {head} "
                f"| {served:.1%} [{low:.1f}, {high:.1f}] | {dataset:.1%} "
                f"| {100 * (served - dataset):+.1f} [{gap_low:+.1f}, {gap_high:+.1f}] "
                f"| {row[f'served_{head}_f1']:.3f} | {ref[f'{head}_f1']:.3f} "
                f"| {row['preprocess_ms']:.1f} |"
            )
    return "\n".join(lines)


def log_result(settings: Settings, result: Evaluation) -> None:
    """Metrics (photos_<context>x_<head>_acc, ...) and the table on the version's training run."""
    client = runs.client_for(settings.tracking_uri)
    logged = {f"photos_dataset_{k}": v for k, v in result.dataset.items()}
    for row in result.contexts:
        prefix = f"photos_{row['context']:g}x"
        logged |= {
            f"{prefix}_{k.removeprefix('served_')}": v for k, v in row.items() if k != "context"
        }
    stamp = int(time.time() * 1000)
    client.log_batch(
        result.run_id,
        metrics=[mlflow.entities.Metric(k, v, stamp, 0) for k, v in logged.items()],
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"photos-{Path(result.folder).name}-{time.strftime('%Y%m%d-%H%M%S')}.md"
        path.write_text(table(result) + "\n")
        client.log_artifact(result.run_id, str(path), artifact_path="evaluation")
