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
from tests.conftest import astronaut_face, jpeg


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    face = astronaut_face()
    for i, (age, gender, race) in enumerate([(41, 1, 0), (30, 0, 1), (8, 1, 2), (70, 0, 3)]):
        face.rotate(0 if i < 2 else 3 * i).save(folder / f"{age}_{gender}_{race}_2017010{i}.jpg")
    return folder


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
    assert evaluate.scores(pred, truth)["gender_acc"] == 0.5


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


def test_evaluate_table_and_mlflow(registered: Settings, photos: Path, capsys) -> None:
    result = evaluate.run(registered, photos, "champion", (1, 2))
    assert [row["context"] for row in result["contexts"]] == [1, 2]
    assert result["photos"] == 4 and result["version"] == "1"
    for row in result["contexts"]:
        assert 0 <= row["served_age_acc"] <= 1 and 0 <= row["found"] <= 1
        assert row["served_age_acc_low"] <= row["served_age_acc"] <= row["served_age_acc_high"]
    text = evaluate.table(result)
    assert text.count("| 2x |") == 3 and "dataset acc" in text
    run = MlflowClient(registered.tracking_uri).get_run(result["run_id"])
    assert (
        "photos_2x_gender_acc" in run.data.metrics and "photos_dataset_age_f1" in run.data.metrics
    )

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
