"""Two registered versions on the same photos through the service's preprocessing: each head's
accuracy, their paired difference with its 95% bootstrap interval, and each version's network time
per face (its own flip averaging and members; one thread). Tells whether a version that won on
validation also answers photos better, and what it costs.

`python -m bench.versions --photos ../shared/data/utkface_photos 1 2` with the stores of the
FACEOPT_* settings; versions by number or alias.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from bench import save
from pipeline import evaluate
from pipeline.config import Settings
from pipeline.data import labels
from pipeline.training import metrics


def network_ms(model, faces: np.ndarray, repeats: int = 20) -> float:
    """Milliseconds per call of the version's probabilities on `faces` (after one warm-up call)."""
    model.probabilities(faces)
    started = time.perf_counter()
    for _ in range(repeats):
        model.probabilities(faces)
    return 1000 * (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--photos", type=Path, required=True)
    parser.add_argument("first", help="version number or alias")
    parser.add_argument("second", help="version number or alias")
    parser.add_argument("--no-save", action="store_true", help="print only (tests)")
    args = parser.parse_args()
    settings = Settings()
    torch.set_num_threads(1)
    photos = evaluate.read_photos(args.photos)
    cut = evaluate.served_faces(photos.raws, settings, "photos")
    answered = np.array([f.answered for f in cut])
    pixels = np.stack([f.pixels for f in cut])
    found, right, ms = {}, {}, {}
    for name in (args.first, args.second):
        version, model = evaluate.resolve(settings, name)
        found[name] = version.version
        truth = photos.truth(tuple(model.meta["age_edges"]))
        pred = evaluate.predict(model, pixels, answered)
        right[name] = {head: pred[head] == truth[head] for head in labels.HEADS}
        ms[name] = (network_ms(model, pixels[:1]), network_ms(model, pixels[:32]) / 32)
    a, b = args.first, args.second
    diff = {h: right[a][h].astype(np.int8) - right[b][h] for h in labels.HEADS}
    interval = metrics.bootstrap(diff)
    lines = [
        f"# {settings.model_name} v{found[a]} against v{found[b]}: {len(photos.names)} photos of "
        f"{args.photos}, served at 1x (photos, not arrays)",
        "",
        f"| head | v{found[a]} | v{found[b]} | difference (points) [95%, paired] |",
        "| --- | --- | --- | --- |",
    ]
    for head in labels.HEADS:
        low, high = (100 * end for end in interval[head])
        lines.append(
            f"| {head} | {right[a][head].mean():.1%} | {right[b][head].mean():.1%} "
            f"| {100 * diff[head].mean():+.1f} [{low:+.1f}, {high:+.1f}] |"
        )
    lines += [
        "",
        "Network time per face, one thread (the face cut not included): "
        + "; ".join(
            f"v{found[n]} {ms[n][0]:.1f} ms for one face, {ms[n][1]:.1f} ms each in a batch of 32"
            for n in (a, b)
        )
        + ".",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_save:
        save("versions", text)


if __name__ == "__main__":
    main()
