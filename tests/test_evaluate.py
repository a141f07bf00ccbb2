"""faceopt evaluate: photos through the service's preprocessing, next to the dataset conversion."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline import cli, evaluate
from pipeline.config import Settings
from pipeline.training import metrics
from tests.conftest import astronaut_face, jpeg


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    face = astronaut_face()
    for i, (age, gender, race) in enumerate([(41, 1, 0), (30, 0, 1), (8, 1, 2), (70, 0, 3)]):
        face.rotate(0 if i < 2 else 3 * i).save(folder / f"{age}_{gender}_{race}_2017010{i}.jpg")
    return folder


@pytest.mark.slow
def test_in_a_photo_puts_the_face_in_the_middle() -> None:
    face = astronaut_face()
    raw = jpeg(face)
    for surround in evaluate.SURROUNDS:
        photo = Image.open(io.BytesIO(evaluate.in_a_photo(raw, 3, surround)))
        assert photo.size == (600, 600)
        # The middle (less the edge that the blur blends) is the photo itself.
        middle = np.asarray(photo.crop((220, 220, 380, 380)).convert("L"), dtype=float)
        inner = np.asarray(face.crop((20, 20, 180, 180)).convert("L"), dtype=float)
        assert np.abs(middle - inner).mean() < 4
    with pytest.raises(evaluate.EvaluateError, match="surround"):
        evaluate.in_a_photo(raw, 2, "checkers")


def test_no_answer_counts_as_wrong() -> None:
    truth = {h: np.array([0, 1, 1, 0]) for h in ("age", "ethnicity", "gender")}
    pred = {h: np.array([0, 1, evaluate.NO_ANSWER, evaluate.NO_ANSWER]) for h in truth}
    scores = evaluate.scores(pred, truth)
    assert scores["gender_acc"] == 0.5
    assert scores["gender_f1"] == pytest.approx(2 / 3)  # F1 of 0 and of 1: 2 / (2 + 1) each


def test_macro_f1_of_a_known_case() -> None:
    """Each class true or predicted counts once: 0 has F1 2/3, 1 (predicted thrice, true once)
    1/2, and 2 (never predicted) 0; unless the classes are given."""
    truth, pred = np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1])
    assert metrics.macro_f1(truth, pred) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert metrics.macro_f1(truth, pred, np.array([0, 1])) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert metrics.macro_f1(truth, truth) == 1.0


def test_intervals_of_the_accuracy_and_the_paired_gap() -> None:
    """The gap's interval pairs each photo's two answers: one right both ways is no gap."""
    truth = {h: np.array([0, 1] * 50) for h in ("age", "ethnicity", "gender")}
    served = {h: t.copy() for h, t in truth.items()}
    served["gender"][:10] = 1 - served["gender"][:10]  # 90% right
    converted = {h: t.copy() for h, t in served.items()}  # the same answers: no gap at all
    converted["age"] = 1 - truth["age"]  # every one wrong: the gap is +100 points exactly
    found = evaluate.intervals(served, converted, truth)
    assert found["gender_gap_low"] == found["gender_gap_high"] == 0
    assert found["age_gap_low"] == found["age_gap_high"] == 1
    assert found["age_acc_low"] == found["age_acc_high"] == 1
    assert 0.8 < found["gender_acc_low"] < 0.9 < found["gender_acc_high"] < 0.97


def test_evaluate_table_and_mlflow(registered: Settings, photos: Path, capsys, monkeypatch) -> None:
    """The accuracies are those of the model's answers against the labels in the file names,
    counted here apart: the dataset conversion's first, then each context's."""
    names, answers = [], []  # what the model answered, in the order evaluate asked
    real_read, real_predict = evaluate.read_photos, evaluate.predict

    def read_photos(folder):
        found = real_read(folder)
        names.extend(found.names)
        return found

    def predict(model, pixels, answered):
        pred = real_predict(model, pixels, answered)
        answers.append((tuple(model.meta["age_edges"]), answered.copy(), pred))
        return pred

    monkeypatch.setattr(evaluate, "read_photos", read_photos)
    monkeypatch.setattr(evaluate, "predict", predict)
    result = evaluate.run(registered, photos, "champion", (1, 2))
    monkeypatch.undo()
    assert [row["context"] for row in result.contexts] == [1, 2]
    assert result.photos == 4 and result.version == "1" and len(answers) == 3
    edges = answers[0][0]
    truth = {"age": [], "ethnicity": [], "gender": []}  # <age>_<gender>_<race>_<datetime>.jpg
    for name in names:
        age, gender, race = (int(v) for v in name.split("_")[:3])
        truth["age"].append(sum(age > edge for edge in edges[1:-1]))  # bracket (lo, hi]
        truth["ethnicity"].append(race)
        truth["gender"].append(gender)

    def accuracy(pred: dict, head: str) -> float:  # no answer (-1) is never a label: wrong
        return sum(int(p) == t for p, t in zip(pred[head], truth[head], strict=True)) / len(names)

    _, everyone, converted = answers[0]
    assert everyone.all()
    for head in truth:
        assert result.dataset[f"{head}_acc"] == pytest.approx(accuracy(converted, head))
    for row, (_, answered, pred) in zip(result.contexts, answers[1:], strict=True):
        assert row["found"] == pytest.approx(answered.mean())
        for head in truth:
            assert row[f"served_{head}_acc"] == pytest.approx(accuracy(pred, head))
            low, high = row[f"served_{head}_acc_low"], row[f"served_{head}_acc_high"]
            assert low <= row[f"served_{head}_acc"] <= high
    text = evaluate.table(result)
    assert text.count("| 2x |") == 3 and "dataset acc" in text
    run = MlflowClient(registered.tracking_uri).get_run(result.run_id)
    assert run.data.metrics["photos_2x_gender_acc"] == pytest.approx(
        result.contexts[1]["served_gender_acc"]
    )
    assert run.data.metrics["photos_dataset_age_acc"] == pytest.approx(result.dataset["age_acc"])
    assert "photos_dataset_age_f1" in run.data.metrics

    code = cli.main(
        [
            "evaluate",
            "--photos",
            str(photos),
            "--context",
            "1,3",
            "--tracking-uri",
            registered.tracking_uri,
            "--model-name",
            registered.model_name,
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "| 3x |" in out and "logged to run" in out


def test_evaluate_errors_name_what_is_wrong(registered: Settings, photos: Path, capsys) -> None:
    (photos / "not_a_utk_name.jpg").write_bytes(b"x")
    with pytest.raises(evaluate.EvaluateError, match="not_a_utk_name.jpg"):
        evaluate.run(registered, photos)
    (photos / "not_a_utk_name.jpg").unlink()
    with pytest.raises(evaluate.EvaluateError, match="no version '7'"):
        evaluate.run(registered, photos, "7")
    args = ["evaluate", "--photos", str(photos), "--context", "0.5"]
    assert cli.main(args) == 2 and "--context" in capsys.readouterr().err
