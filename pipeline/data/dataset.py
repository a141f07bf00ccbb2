"""Load the Kaggle age_gender.csv or a UTKFace folder into one in-memory FaceSet, cached, and split it."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from pipeline.data import descriptor, labels, preprocess
from pipeline.data.inputs import SEED_FORM, InputSpec, to_pixels
from pipeline.errors import FaceoptError

log = logging.getLogger(__name__)

PIXELS = preprocess.SIZE * preprocess.SIZE
CSV_COLUMNS = ("age", "ethnicity", "gender", "pixels")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# UTKFace names: <age>_<gender>_<race>_<datetime>.jpg[.chip.jpg]
UTK_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_(.+)$")
CACHE_VERSION = "2"  # bump when the decoded layout changes, so old caches are ignored
LABEL_RANGES = {
    "age": (0, labels.MAX_AGE),
    "ethnicity": (0, len(labels.ETHNICITIES) - 1),
    "gender": (0, len(labels.GENDERS) - 1),
}


class DataError(FaceoptError, ValueError):
    """The dataset is missing or malformed; the message says where and what was expected."""


@dataclass(frozen=True)
class FaceSet:
    """Decoded faces in one input form (uint8 N x 48 x 48 for the CSV; N x S x S or N x S x S x 3
    from a folder) plus one label array per field."""

    images: np.ndarray
    age: np.ndarray
    ethnicity: np.ndarray
    gender: np.ndarray
    names: np.ndarray
    fingerprint: str  # sha256 of the source's content
    # A folder's faces: the file of each row, and a key per row that is equal for byte-identical
    # 48x48 grayscale conversions, so the split does not depend on the input form decoded.
    files: np.ndarray | None = None
    keys: np.ndarray | None = None
    skipped: tuple[str, ...] = ()  # files left out: no labels in the name (or unreadable)
    descriptors: np.ndarray | None = None  # float32 N x D face features, when the form has them

    def __len__(self) -> int:
        return len(self.images)

    def targets(self, rows: np.ndarray, edges: tuple[int, ...]) -> dict[str, np.ndarray]:
        """The class index of each head for `rows`, age as its bracket."""
        return labels.targets(self.age[rows], self.ethnicity[rows], self.gender[rows], edges)


# Part of every split digest: a study made with an earlier way of splitting is refused, not mixed.
SPLIT_VERSION = "groups-v2"


@dataclass(frozen=True)
class Duplicates:
    """Byte-identical images: how many groups of copies, and how many disagree on a label."""

    groups: int
    rows: int
    conflicting_groups: int
    conflicting_rows: int
    dropped: bool  # the conflicting rows were left out of every part


@dataclass(frozen=True)
class Split:
    """Row indices of a seeded, stratified train / validation / test split; copies of one image
    are always on the same side."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    seed: int
    duplicates: Duplicates

    def digest(self) -> str:
        h = hashlib.sha256(SPLIT_VERSION.encode())
        for part in (self.train, self.val, self.test):
            h.update(np.ascontiguousarray(part, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]

    def sizes(self) -> dict:
        """Rows per part and the split's digest: the profile of the data a run used."""
        return {
            "train": len(self.train),
            "val": len(self.val),
            "test": len(self.test),
            "split_digest": self.digest(),
        }

    def summary(self) -> dict:
        d = self.duplicates
        return {
            "seed": self.seed,
            "train": len(self.train),
            "val": len(self.val),
            "test": len(self.test),
            "digest": self.digest(),
            "duplicate_groups": d.groups,
            "duplicate_rows": d.rows,
            "conflicting_groups": d.conflicting_groups,
            "conflicting_rows": d.conflicting_rows,
            "conflicting_dropped": d.dropped,
        }


def missing_data_message(path: Path) -> str:
    return (
        f"No dataset at {path}. Either pass your own file: `make tune DATA=/path/to/age_gender.csv` "
        "(the Kaggle CSV, .csv or .csv.gz, or a UTKFace folder of JPEGs), or run `make data` to "
        "download it with the Kaggle client (needs ~/.kaggle/kaggle.json or KAGGLE_USERNAME and "
        "KAGGLE_KEY)."
    )


def load(
    path: Path, cache_dir: Path, skip_bad_rows: bool = False, spec: InputSpec = SEED_FORM
) -> FaceSet:
    """Load a CSV(.gz) or UTKFace folder in the input form `spec`, from the cache when its
    content was decoded in that form before; face descriptors are cached beside the pixels."""
    path = Path(path)
    if not path.exists():
        raise DataError(missing_data_message(path))
    if not path.is_dir() and spec.takes_chips:
        raise DataError(
            f"{path}: the Kaggle CSV holds 48x48 grayscale faces only; colour, other sizes and "
            f"face descriptors ({spec.size} px {spec.colour}, {spec.features}) need a UTKFace "
            "folder of the original photos: DATA=/path/to/UTKFace"
        )
    digest = fingerprint(path)
    cache = _cache_path(path, Path(cache_dir), digest, skip_bad_rows, spec)
    if cache.exists():
        log.info("loading %s from cache %s", path, cache)
        faces = _read_cache(cache, digest)
    else:
        faces = _decode(path, digest, skip_bad_rows, spec)
        _write_cache(cache, faces)
    if spec.descriptor:
        faces = replace(
            faces,
            descriptors=_descriptors(
                path, faces, cache.parent, skip_bad_rows, spec.descriptor_kind
            ),
        )
    return faces


def fingerprint(path: Path) -> str:
    """sha256 of a file's bytes, or of a folder's image names and bytes in sorted order."""
    h = hashlib.sha256()
    if path.is_dir():
        for file in image_files(path):
            h.update(file.name.encode())
            h.update(file.read_bytes())
    else:
        with open(path, "rb") as f:
            h = hashlib.file_digest(f, "sha256")
    return h.hexdigest()


def _decode(path: Path, digest: str, skip_bad_rows: bool, spec: InputSpec) -> FaceSet:
    if path.is_dir():
        return read_utkface(path, digest, skip_bad_rows, spec)
    return read_csv(path, digest, skip_bad_rows)


def _descriptors(
    folder: Path, faces: FaceSet, cache_dir: Path, skip_bad_rows: bool, kind: str
) -> np.ndarray:
    """The pretrained face features (`kind`, see pipeline.data.descriptor) of each face's chip
    file, computed once per folder content (with a progress bar) and cached as float32 N x D
    beside the decoded pixels."""
    skip = "-skip" if skip_bad_rows else ""
    name = f"{folder.name}-{faces.fingerprint[:16]}-v{CACHE_VERSION}{skip}-{kind}.npy"
    cache = cache_dir / name
    if cache.exists():
        found = np.load(cache, allow_pickle=False)
        if found.shape == (len(faces), descriptor.dim(kind)):
            return found
        log.warning("ignoring %s: shape %s, the faces have %d", cache, found.shape, len(faces))
    log.info("computing face features of %d faces (once; cached at %s)", len(faces), cache)
    found = descriptor.for_files([folder / f for f in faces.files], kind)
    _atomic_write(cache, lambda f: np.save(f, found))
    return found


# --- cache -------------------------------------------------------------------------------------


def _cache_path(
    path: Path, cache_dir: Path, digest: str, skip_bad_rows: bool, spec: InputSpec
) -> Path:
    """Next to the source when that folder is writable (shared data often is not), else cache_dir."""
    form = f"-{spec.size}{spec.colour}" if path.is_dir() else ""
    skip = "-skip" if skip_bad_rows else ""
    name = f"{path.name}-{digest[:16]}-v{CACHE_VERSION}{form}{skip}.npz"
    beside = path.parent / ".faceopt-cache"
    # Write bits, not just os.access: root may write anywhere, but a folder without write bits
    # (like a shared, read-only data folder) is meant to stay untouched.
    if os.access(path.parent, os.W_OK) and path.parent.stat().st_mode & 0o222:
        return beside / name
    return cache_dir / name


ARRAYS = ("images", "age", "ethnicity", "gender", "names")
FOLDER_ARRAYS = ("files", "keys", "skipped")


def _read_cache(cache: Path, digest: str) -> FaceSet:
    with np.load(cache, allow_pickle=False) as z:
        extra = {k: z[k] for k in FOLDER_ARRAYS if k in z}
        if "skipped" in extra:
            extra["skipped"] = tuple(str(n) for n in extra["skipped"])
        return FaceSet(**{k: z[k] for k in ARRAYS}, fingerprint=digest, **extra)


def _write_cache(cache: Path, faces: FaceSet) -> None:
    arrays = {k: getattr(faces, k) for k in ARRAYS}
    if faces.files is not None:
        arrays |= {"files": faces.files, "keys": faces.keys, "skipped": np.array(faces.skipped)}
    _atomic_write(cache, lambda f: np.savez(f, **arrays))
    log.info("cached decoded faces at %s (%.0f MB)", cache, faces.images.nbytes / 2**20)


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write atomically, so an interrupted run never leaves a half-written cache behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- CSV ---------------------------------------------------------------------------------------


def read_csv(path: Path, digest: str = "", skip_bad_rows: bool = False) -> FaceSet:
    """Decode the Kaggle age_gender.csv; every bad row is named, then raised or skipped."""
    log.info("decoding %s", path)
    try:
        # object, not str: pandas 3 would copy every 9 KB pixels string into Arrow and back (2 s).
        df = pd.read_csv(path, dtype=object, keep_default_na=False)
    except (
        pd.errors.ParserError,
        pd.errors.EmptyDataError,
        UnicodeDecodeError,
        OSError,
        EOFError,
    ) as e:
        raise DataError(f"{path}: not a readable CSV ({e})") from e
    missing = [c for c in CSV_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {missing}; expected columns "
            f"age,ethnicity,gender,img_name,pixels, found {list(df.columns)}"
        )
    names = df["img_name"].to_numpy(str) if "img_name" in df else np.arange(len(df)).astype(str)
    values, problems = _label_values(df)
    images, pixel_problems = _parse_pixels(df["pixels"])
    for row, reason in pixel_problems.items():
        problems.setdefault(row, reason)
    keep = _handle_problems(path, problems, names, skip_bad_rows, unit="row")
    return FaceSet(
        images=images[keep],
        age=values["age"][keep].astype(np.int16),
        ethnicity=values["ethnicity"][keep].astype(np.int8),
        gender=values["gender"][keep].astype(np.int8),
        names=names[keep],
        fingerprint=digest,
    )


def _label_values(df: pd.DataFrame) -> tuple[dict[str, np.ndarray], dict[int, str]]:
    """Integer labels per column, and a reason for each row whose label is not a known value."""
    values, problems = {}, {}
    for col, (lo, hi) in LABEL_RANGES.items():
        raw = df[col].str.strip()
        num = pd.to_numeric(raw, errors="coerce").to_numpy(float)
        bad = ~(np.isfinite(num) & (num == np.round(num)) & (num >= lo) & (num <= hi))
        for row in np.flatnonzero(bad):
            problems.setdefault(
                int(row), f"column '{col}' has {raw.iloc[row]!r}, expected an integer in {lo}..{hi}"
            )
        values[col] = np.where(bad, 0, num).astype(np.int64)
    return values, problems


def _parse_pixels(pixels: pd.Series) -> tuple[np.ndarray, dict[int, str]]:
    """All rows in one vectorised parse; only when that fails are rows looked at one by one."""
    n = len(pixels)
    texts = pixels.tolist()
    # str.count per row in C; pandas' .str.count goes through a regex and is 50x slower.
    counts = np.array([t.count(" ") + 1 for t in texts])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # older numpy warns on a bad token instead of raising
            flat = np.fromstring(" ".join(texts), dtype=np.int64, sep=" ")
    except ValueError:  # a token that is not an integer; the row-by-row pass names it
        flat = np.empty(0, dtype=np.int64)
    if flat.size == n * PIXELS and (counts == PIXELS).all():
        grid = flat.reshape(n, PIXELS)
        # Seen as unsigned, a negative value is over 255 too. Such rows are raised or skipped
        # (_handle_problems), so their wrapped uint8 values are never used.
        out_of_range = np.flatnonzero(grid.view(np.uint64).max(axis=1) > 255)
        problems = {int(r): _range_problem(grid[r]) for r in out_of_range}
        return grid.astype(np.uint8).reshape(n, preprocess.SIZE, preprocess.SIZE), problems
    images = np.zeros((n, PIXELS), dtype=np.uint8)
    problems = {}
    for row, text in enumerate(tqdm(pixels, desc="checking rows", leave=False)):
        parsed = _parse_row(text)
        if isinstance(parsed, str):
            problems[row] = parsed
        else:
            images[row] = parsed
    return images.reshape(n, preprocess.SIZE, preprocess.SIZE), problems


def _parse_row(text: str) -> np.ndarray | str:
    tokens = text.split()
    if len(tokens) != PIXELS:
        return f"column 'pixels' has {len(tokens)} values, expected {PIXELS} (48x48)"
    try:
        values = np.array([int(t) for t in tokens], dtype=np.int64)
    except ValueError:
        bad = next(t for t in tokens if not t.lstrip("-").isdigit())
        return f"column 'pixels' has {bad!r}, expected integers 0..255"
    if values.min() < 0 or values.max() > 255:
        return _range_problem(values)
    return values.astype(np.uint8)


def _range_problem(values: np.ndarray) -> str:
    bad = values[(values < 0) | (values > 255)][0]
    return f"column 'pixels' has value {bad}, expected 0..255"


def _handle_problems(
    source: Path, problems: dict[int, str], names: np.ndarray, skip: bool, unit: str
) -> np.ndarray:
    """Raise on the first bad row, or (skip=True) log them all and return the rows to keep."""
    keep = np.ones(len(names), dtype=bool)
    if not problems:
        return keep
    rows = sorted(problems)

    def where(r: int) -> str:
        line = f" (line {r + 2})" if unit == "row" else ""
        return f"{source}: {unit} {r + 1}{line}, '{names[r]}': {problems[r]}"

    if not skip:
        more = f" ... and {len(rows) - 1} more bad {unit}s." if len(rows) > 1 else ""
        raise DataError(f"{where(rows[0])}.{more} Pass --skip-bad-rows to skip bad {unit}s.")
    for r in rows[:20]:
        log.warning("skipping %s", where(r))
    log.warning("skipped %d bad %s(s) of %d in %s", len(rows), unit, len(names), source)
    keep[rows] = False
    return keep


# --- UTKFace folder ----------------------------------------------------------------------------


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.lower().endswith(IMAGE_SUFFIXES))


def read_utkface(
    folder: Path, digest: str = "", skip_bad_rows: bool = False, spec: InputSpec = SEED_FORM
) -> FaceSet:
    """Decode <age>_<gender>_<race>_<date>.jpg files in the input form `spec` (the seed's form: as
    the CSV was made), labels from the names. Files whose names lack a label (UTKFace's download
    has three) are left out, counted and named; an unreadable image stops the load unless
    skip_bad_rows."""
    files = image_files(folder)
    if not files:
        raise DataError(
            f"{folder}: no .jpg/.jpeg/.png files; expected UTKFace images named "
            "<age>_<gender>_<race>_<datetime>.jpg.chip.jpg"
        )
    parsed = [utk_labels(f.name) for f in files]
    unlabelled = [f.name for f, p in zip(files, parsed, strict=True) if isinstance(p, str)]
    if unlabelled:
        log.warning(
            "left out %d of %d files in %s whose names have no <age>_<gender>_<race> labels: %s",
            len(unlabelled),
            len(files),
            folder,
            ", ".join(unlabelled[:20]) + (" ..." if len(unlabelled) > 20 else ""),
        )
    files = [f for f, p in zip(files, parsed, strict=True) if not isinstance(p, str)]
    label_rows = np.array([p for p in parsed if not isinstance(p, str)], dtype=np.int64)
    names = np.array([f.name for f in files])
    shape = (spec.size, spec.size) + ((3,) if spec.colour == "rgb" else ())
    images = np.zeros((len(files), *shape), dtype=np.uint8)
    keys = np.zeros(len(files), dtype="S16")
    problems: dict[int, str] = {}
    # Pillow releases the GIL while decoding, so threads use every core.
    with ThreadPoolExecutor() as pool:
        decoded = pool.map(lambda f: _decode_image(f, spec), files)
        for i, result in enumerate(tqdm(decoded, total=len(files), desc="decoding images")):
            if isinstance(result, str):
                problems[i] = result
            else:
                images[i], keys[i] = result
    keep = _handle_problems(folder, problems, names, skip_bad_rows, unit="file")
    unreadable = tuple(names[~keep])
    return FaceSet(
        images=images[keep],
        age=label_rows[keep, 0].astype(np.int16),
        ethnicity=label_rows[keep, 2].astype(np.int8),
        gender=label_rows[keep, 1].astype(np.int8),
        names=np.array([UTK_NAME.match(n)[4] for n in names[keep]]),
        fingerprint=digest,
        files=names[keep],
        keys=keys[keep],
        skipped=(*unlabelled, *unreadable),
    )


def utk_labels(name: str) -> tuple[int, int, int] | str:
    m = UTK_NAME.match(name)
    if not m:
        return "file name is not <age>_<gender>_<race>_<datetime>.jpg"
    age, gender, race = (int(g) for g in m.groups()[:3])
    for field, value in (("age", age), ("gender", gender), ("ethnicity", race)):
        lo, hi = LABEL_RANGES[field]
        if not lo <= value <= hi:
            return f"{field} {value} in the file name, expected {lo}..{hi}"
    return age, gender, race


def _decode_image(file: Path, spec: InputSpec) -> tuple[np.ndarray, bytes] | str:
    """The face in the input form, and the key of its 48x48 grayscale conversion."""
    try:
        with Image.open(file) as image:
            gray48 = preprocess.to_gray48(image)
            pixels = gray48 if not spec.takes_chips else to_pixels(image, spec)
    except Exception as e:  # Pillow raises many types for corrupt files
        return f"not a readable image ({type(e).__name__}: {e})"
    return pixels, _key(gray48)


def _key(image: np.ndarray) -> bytes:
    return hashlib.blake2b(image.tobytes(), digest_size=16).digest()


# --- split -------------------------------------------------------------------------------------


def duplicate_groups(faces: FaceSet) -> np.ndarray:
    """A group id per row; rows with byte-identical images (a folder: byte-identical 48x48
    grayscale conversions, whatever form was decoded) share one."""
    keys = faces.keys
    if keys is None:
        keys = np.array([_key(image) for image in faces.images], dtype="S16")
    return np.unique(keys, return_inverse=True)[1].ravel()


def _find_duplicates(
    faces: FaceSet, group: np.ndarray, drop: bool
) -> tuple[Duplicates, np.ndarray]:
    """The duplicate counts, and which rows to keep (all, or all but conflicting copies)."""
    sizes = np.bincount(group)
    conflicting = np.zeros(len(sizes), dtype=bool)
    for values in (faces.age, faces.ethnicity, faces.gender):
        lo = np.full(len(sizes), np.iinfo(np.int64).max)
        hi = np.full(len(sizes), np.iinfo(np.int64).min)
        np.minimum.at(lo, group, values)
        np.maximum.at(hi, group, values)
        conflicting |= lo != hi
    found = Duplicates(
        groups=int((sizes > 1).sum()),
        rows=int(sizes[sizes > 1].sum()),
        conflicting_groups=int(conflicting.sum()),
        conflicting_rows=int(sizes[conflicting].sum()),
        dropped=drop,
    )
    if found.groups:
        log.warning(
            "%d groups of byte-identical images (%d rows), each kept on one side of the split; "
            "%d groups (%d rows) disagree on a label: %s",
            found.groups,
            found.rows,
            found.conflicting_groups,
            found.conflicting_rows,
            "left out" if drop else "kept (--skip-bad-rows / SKIP_BAD_ROWS=1 leaves them out)",
        )
    keep = ~conflicting[group] if drop else np.ones(len(group), dtype=bool)
    return found, keep


def split(
    faces: FaceSet,
    edges: tuple[int, ...],
    seed: int,
    test_fraction: float,
    val_fraction: float,
    drop_conflicting: bool = False,
) -> Split:
    """Stratified by (age bracket, ethnicity, gender); same inputs give the same split.

    Whole groups of byte-identical images are dealt out, so a copy of a test face is never a
    training face; a group goes with the stratum of its first row.
    """
    group = duplicate_groups(faces)
    duplicates, keep = _find_duplicates(faces, group, drop_conflicting)
    bracket = labels.age_bracket(faces.age, edges)
    strata = np.ravel_multi_index(
        (bracket, faces.ethnicity, faces.gender),
        (len(edges) - 1, len(labels.ETHNICITIES), len(labels.GENDERS)),
    )
    rows = np.flatnonzero(keep)
    ids, first = np.unique(group[rows], return_index=True)  # each kept group and its first row
    sizes = np.bincount(group[rows], minlength=group.max() + 1)[ids]
    group_strata = strata[rows[first]]
    rng = np.random.default_rng(seed)
    part_of = np.full(group.max() + 1, -1)  # 0 test, 1 validation, 2 train
    for stratum in np.unique(group_strata):
        order = rng.permutation(np.flatnonzero(group_strata == stratum))
        total = sizes[order].sum()
        n_test = round(total * test_fraction)
        n_val = round((total - n_test) * val_fraction)
        before = np.cumsum(sizes[order]) - sizes[order]  # rows dealt out ahead of each group
        part_of[ids[order]] = np.where(before < n_test, 0, np.where(before < n_test + n_val, 1, 2))
    parts = part_of[group[rows]]
    return Split(
        train=rows[parts == 2],
        val=rows[parts == 1],
        test=rows[parts == 0],
        seed=seed,
        duplicates=duplicates,
    )
