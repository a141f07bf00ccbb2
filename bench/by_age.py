"""A head's accuracy per age bracket: photos through the service, the same photos converted as
the dataset was, and the test split's arrays; and the photos' figure weighted to the test split's
age mix. Tells a photo set's makeup apart from the crop when photos and test split disagree.

`python -m bench.by_age --photos ../shared/data/utkface_photos` with the stores and data of the
FACEOPT_* settings (or DATA=...), for the champion or --version.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench import save
from pipeline import evaluate, train_best
from pipeline.config import Settings
from pipeline.data import labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--photos", type=Path, required=True)
    parser.add_argument("--version", default="champion")
    parser.add_argument("--head", default="gender", choices=labels.HEADS)
    parser.add_argument("--no-save", action="store_true", help="print only (tests)")
    args = parser.parse_args()
    settings = Settings()
    photos = evaluate.read_photos(args.photos)
    found, model = evaluate.resolve(settings, args.version)
    edges = tuple(model.meta["age_edges"])
    truth = photos.truth(edges)
    everyone = np.ones(len(photos.names), dtype=bool)
    cut = evaluate.served_faces(photos.raws, settings, "photos")
    answered = np.array([f.answered for f in cut])
    served = evaluate.predict(model, np.stack([f.pixels for f in cut]), answered)
    converted = evaluate.predict(model, evaluate.dataset_faces(photos), everyone)
    # The version's own split, rebuilt from the study it was tuned on (named on the version).
    tuned = settings.model_copy(update={"study": found.tags["optuna.study"]})
    faces, split = train_best.study_split(tuned, train_best.load_best(tuned)[0].user_attrs)
    test_truth = faces.targets(split.test, edges)
    test_pred = evaluate.predict(model, faces.images[split.test], np.ones(len(split.test), bool))

    head = args.head
    lines = [
        f"# {head} accuracy by age bracket: {settings.model_name} v{found.version}, "
        f"{len(photos.names)} photos of {args.photos} (served at 1x) and the test split (arrays)",
        "",
        "| age bracket | photos | served | dataset conversion | test faces | test split |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    share, served_acc = [], []
    for bracket, name in enumerate(labels.bracket_names(edges)):
        on_photo, on_test = truth["age"] == bracket, test_truth["age"] == bracket
        right = served[head][on_photo] == truth[head][on_photo]
        dataset_right = converted[head][on_photo] == truth[head][on_photo]
        test_right = test_pred[head][on_test] == test_truth[head][on_test]
        lines.append(
            f"| {name} | {on_photo.sum()} | {right.mean():.1%} | {dataset_right.mean():.1%} "
            f"| {on_test.sum()} | {test_right.mean():.1%} |"
        )
        share.append(on_test.mean())
        served_acc.append(right.mean())
    lines += [
        "",
        f"Photos, served: {(served[head] == truth[head]).mean():.1%}; weighted to the test split's "
        f"age mix: {np.dot(share, served_acc):.1%}. Test split: "
        f"{(test_pred[head] == test_truth[head]).mean():.1%}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_save:
        save("by-age", text)


if __name__ == "__main__":
    main()
