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


def astronaut_face() -> Image.Image:
    """A real face that ships with scikit-image (no ../shared data): framed like a UTKFace crop."""
    from skimage import data as skdata

    return Image.fromarray(skdata.astronaut()).crop((180, 70, 380, 270))


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
    raw = io.BytesIO()
    face.save(raw, "JPEG", quality=95)
    for surround in evaluate.SURROUNDS:
        photo = Image.open(io.BytesIO(evaluate.in_a_photo(raw.getvalue(), 3, surround)))
        assert photo.size == (600, 600)
        middle = np.asarray(photo.crop((200, 200, 400, 400)).convert("L"), dtype=float)
        assert np.abs(middle - np.asarray(face.convert("L"), dtype=float)).mean() < 4
    with pytest.raises(evaluate.EvaluateError, match="surround"):
        evaluate.in_a_photo(raw.getvalue(), 2, "checkers")


def test_no_answer_counts_as_wrong() -> None:
    truth = {h: np.array([0, 1, 1, 0]) for h in ("age", "ethnicity", "gender")}
    pred = {h: np.array([0, 1, evaluate.NO_ANSWER, evaluate.NO_ANSWER]) for h in truth}
    assert evaluate.scores(pred, truth)["gender_acc"] == 0.5


def test_evaluate_table_and_mlflow(registered: Settings, photos: Path, capsys) -> None:
    result = evaluate.run(registered, photos, "champion", (1, 2))
    assert [row["context"] for row in result["contexts"]] == [1, 2]
    assert result["photos"] == 4 and result["version"] == "1"
    for row in result["contexts"]:
        assert 0 <= row["served_age_acc"] <= 1 and 0 <= row["found"] <= 1
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
