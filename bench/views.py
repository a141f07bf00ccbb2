"""Whether averaging more views of each face than its mirror image would help a registered
version: accuracy on its study's validation split (which would choose) and test split (which
would only report) for the plain face, + mirror, + mirror and four 1-pixel shifts, + mirror and a
zoom in and out. Arrays, not photos.

`python -m bench.views --version 1` with the stores and data of the FACEOPT_* settings (or
DATA=...).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench import save
from pipeline import evaluate, train_best
from pipeline.config import Settings
from pipeline.data import labels
from pipeline.training import train


def shift(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """The face moved by (dx, dy) pixels, edges repeated."""
    size = x.shape[-1]
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return padded[..., 1 + dy : 1 + dy + size, 1 + dx : 1 + dx + size]


def zoom(x: torch.Tensor, factor: float) -> torch.Tensor:
    """The face scaled by `factor` about its centre, cropped or edge-padded back to its size."""
    size = x.shape[-1]
    n = round(size * factor)
    y = F.interpolate(x, size=(n, n), mode="bilinear", align_corners=False, antialias=factor < 1)
    if n >= size:
        o = (n - size) // 2
        return y[..., o : o + size, o : o + size]
    o = (size - n) // 2
    return F.pad(y, (o, size - n - o, o, size - n - o), mode="replicate")


VIEWS = {
    "plain": lambda x: x,
    "mirror": lambda x: x.flip(-1),
    **{
        f"shift{dx:+d}{dy:+d}": (lambda x, dx=dx, dy=dy: shift(x, dx, dy))
        for dx in (-1, 1)
        for dy in (-1, 1)
    },
    "zoom1.08": lambda x: zoom(x, 1.08),
    "zoom0.92": lambda x: zoom(x, 0.92),
}
SETS = {
    "plain": ["plain"],
    "+ mirror": ["plain", "mirror"],
    "+ mirror, 4 shifts": ["plain", "mirror", "shift-1-1", "shift-1+1", "shift+1-1", "shift+1+1"],
    "+ mirror, zoom 1.08 and 0.92": ["plain", "mirror", "zoom1.08", "zoom0.92"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--version", default="champion")
    parser.add_argument("--no-save", action="store_true", help="print only (tests)")
    args = parser.parse_args()
    settings = Settings()
    found, model = evaluate.resolve(settings, args.version)
    tuned = settings.model_copy(update={"study": found.tags["optuna.study"]})
    faces, split = train_best.study_split(tuned, train_best.load_best(tuned)[0].user_attrs)
    edges = tuple(model.meta["age_edges"])
    lines = [
        f"# {settings.model_name} v{found.version}: accuracy with more views per face (arrays)",
        "",
        "| split | views | " + " | ".join(labels.HEADS) + " | mean |",
        "| --- | --- |" + " --- |" * (len(labels.HEADS) + 1),
    ]
    for part in ("val", "test"):
        data = train.to_tensors(faces, getattr(split, part), edges, torch.device("cpu"))
        logits = {
            name: train.predict_logits(model.net, view(data.x)) for name, view in VIEWS.items()
        }
        for name, views in SETS.items():
            mean = {h: sum(logits[v][h] for v in views) / len(views) for h in labels.HEADS}
            scores = train.accuracies(mean, data.y)
            lines.append(
                f"| {part} | {name} | "
                + " | ".join(f"{scores[train.metric_key(h)]:.4f}" for h in labels.HEADS)
                + f" | {scores[train.metric_key('mean')]:.4f} |"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_save:
        save("views", text)


if __name__ == "__main__":
    main()
