from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.data import dataset, labels
from tests.conftest import synthetic_faces, write_csv

EDGES = (0, 3, 18, 45, 64, 116)


def test_csv_and_gzip_load_the_same_faces(tmp_path: Path) -> None:
    df = synthetic_faces(20)
    plain = dataset.load(write_csv(df, tmp_path / "a.csv"), tmp_path / "c")
    df.to_csv(tmp_path / "a.csv.gz", index=False)
    gz = dataset.load(tmp_path / "a.csv.gz", tmp_path / "c")
    assert plain.images.shape == (20, 48, 48) and plain.images.dtype == np.uint8
    assert np.array_equal(plain.images, gz.images)
    assert np.array_equal(plain.age, df["age"].to_numpy())
    assert plain.images[3].ravel().tolist() == [int(v) for v in df["pixels"][3].split()]


def test_second_load_comes_from_the_cache(tmp_path: Path, monkeypatch) -> None:
    path = write_csv(synthetic_faces(10), tmp_path / "a.csv")
    first = dataset.load(path, tmp_path / "c")
    caches = list((tmp_path / ".faceopt-cache").glob("*.npz"))
    assert len(caches) == 1 and first.fingerprint[:16] in caches[0].name
    path.unlink()
    path.write_bytes(b"")  # same name, other content: must not be served from the old cache
    with pytest.raises(dataset.DataError):
        dataset.load(path, tmp_path / "c")
    write_csv(synthetic_faces(10), path)

    def no_decoding(*args):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(dataset, "_decode", no_decoding)  # the same content again: the cache
    again = dataset.load(path, tmp_path / "c")
    assert np.array_equal(again.images, first.images)
    assert np.array_equal(again.age, first.age) and again.fingerprint == first.fingerprint


def test_read_only_folder_caches_in_cache_dir(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    path = write_csv(synthetic_faces(5), ro / "a.csv")
    ro.chmod(0o555)
    try:
        dataset.load(path, tmp_path / "c")
    finally:
        ro.chmod(0o755)
    assert not (ro / ".faceopt-cache").exists()
    assert len(list((tmp_path / "c").glob("*.npz"))) == 1


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("pixels", "1 2 3", "has 3 values, expected 2304"),
        ("pixels", " ".join(["7"] * 2303 + ["256"]), "value 256, expected 0..255"),
        ("pixels", " ".join(["7"] * 2303 + ["-1"]), "value -1, expected 0..255"),
        ("pixels", " ".join(["7"] * 2303 + ["x"]), "'x', expected integers 0..255"),
        ("pixels", " ".join(["7"] * 2303 + ["1.5"]), "'1.5', expected integers"),
        ("ethnicity", "7", "column 'ethnicity' has '7', expected an integer in 0..4"),
        ("gender", "2", "column 'gender' has '2', expected an integer in 0..1"),
        ("age", "abc", "column 'age' has 'abc', expected an integer in 0..116"),
        ("age", "", "column 'age' has '', expected an integer"),
    ],
)
def test_bad_row_is_named(tmp_path: Path, column: str, value: str, message: str) -> None:
    df = synthetic_faces(6).astype({column: object})
    df.loc[4, column] = value
    path = write_csv(df, tmp_path / "bad.csv")
    with pytest.raises(dataset.DataError) as err:
        dataset.load(path, tmp_path / "c")
    text = str(err.value)
    assert message in text and "row 5 (line 6)" in text and str(path) in text
    assert df.loc[4, "img_name"] in text and "--skip-bad-rows" in text
    assert not list(tmp_path.glob("**/*.npz"))  # nothing half-written


def test_skip_bad_rows_reports_and_drops(tmp_path: Path, caplog) -> None:
    df = synthetic_faces(8).astype({"gender": object})
    df.loc[2, "gender"] = "9"
    df.loc[6, "pixels"] = "1 2"
    faces = dataset.load(write_csv(df, tmp_path / "bad.csv"), tmp_path / "c", skip_bad_rows=True)
    assert len(faces) == 6
    assert set(faces.names) == set(df["img_name"].drop([2, 6]))
    assert "skipped 2 bad row(s) of 8" in caplog.text


def test_missing_column_and_missing_file(tmp_path: Path) -> None:
    path = write_csv(synthetic_faces(3).drop(columns=["gender"]), tmp_path / "a.csv")
    with pytest.raises(dataset.DataError, match=r"missing column\(s\) \['gender'\]"):
        dataset.load(path, tmp_path / "c")
    with pytest.raises(dataset.DataError, match="make data"):
        dataset.load(tmp_path / "nope.csv", tmp_path / "c")


def test_utkface_folder_matches_csv_conversion(utk_folder: Path, tmp_path: Path) -> None:
    faces = dataset.load(utk_folder, tmp_path / "c")
    assert len(faces) == 12 and faces.images.shape == (12, 48, 48)
    first = sorted(utk_folder.iterdir())[0].name
    age, gender, race = (int(x) for x in first.split("_")[:3])
    assert (faces.age[0], faces.gender[0], faces.ethnicity[0]) == (age, gender, race)
    assert faces.names[0] == first.split("_", 3)[3]  # the CSV's img_name: no label prefix


def test_utkface_bad_names_and_files(
    utk_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # UTKFace's download has three such names: left out by default, counted and named plainly.
    unlabelled = "39_1_20170116174525125.jpg.chip.jpg"
    (utk_folder / unlabelled).write_bytes(b"x")  # no race field
    with caplog.at_level("WARNING"):
        faces = dataset.load(utk_folder, tmp_path / "c")
    assert len(faces) == 12 and faces.skipped == (unlabelled,)
    assert f"left out 1 of 13 files in {utk_folder}" in caplog.text and unlabelled in caplog.text
    assert dataset.load(utk_folder, tmp_path / "c").skipped == (unlabelled,)  # from the cache
    (utk_folder / unlabelled).unlink()
    (utk_folder / "30_0_1_broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(dataset.DataError, match="not a readable image") as e:
        dataset.load(utk_folder, tmp_path / "c")
    assert "'30_0_1_broken.jpg'" in str(e.value) and "np.str_" not in str(e.value)
    faces = dataset.load(utk_folder, tmp_path / "c", skip_bad_rows=True)
    assert len(faces) == 12 and faces.skipped == ("30_0_1_broken.jpg",)


def test_split_is_stratified_seeded_and_disjoint(tmp_path: Path) -> None:
    faces = dataset.load(write_csv(synthetic_faces(400), tmp_path / "a.csv"), tmp_path / "c")
    a = dataset.split(faces, EDGES, seed=1, test_fraction=0.2, val_fraction=0.2)
    b = dataset.split(faces, EDGES, seed=1, test_fraction=0.2, val_fraction=0.2)
    c = dataset.split(faces, EDGES, seed=2, test_fraction=0.2, val_fraction=0.2)
    assert a.digest() == b.digest() != c.digest()
    parts = [set(a.train), set(a.val), set(a.test)]
    assert sum(map(len, parts)) == 400 and not (parts[0] & parts[1] or parts[0] & parts[2])
    assert 70 <= len(a.test) <= 90
    share = lambda rows: np.bincount(faces.gender[rows], minlength=2) / len(rows)  # noqa: E731
    assert np.abs(share(a.test) - share(a.train)).max() < 0.06


def test_duplicates_never_straddle_a_split(tmp_path: Path) -> None:
    df = synthetic_faces(300)
    # 40 images copied 2-4 times; every other group with a copy whose labels disagree.
    copies = []
    for k, row in enumerate(range(0, 200, 5)):
        for c in range(2 + k % 3):
            copy = df.iloc[row].copy()
            if k % 2 and c == 0:
                copy["gender"] = 1 - copy["gender"]
            copies.append(copy)
    df = pd.concat([df, pd.DataFrame(copies)], ignore_index=True)
    faces = dataset.load(write_csv(df, tmp_path / "dups.csv"), tmp_path / "c")
    group = dataset.duplicate_groups(faces)
    for seed in range(5):
        split = dataset.split(faces, EDGES, seed=seed, test_fraction=0.2, val_fraction=0.2)
        sides = [set(group[part]) for part in (split.train, split.val, split.test)]
        assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
        assert len(split.train) + len(split.val) + len(split.test) == len(faces)
    found = split.duplicates
    assert (found.groups, found.conflicting_groups) == (40, 20)
    assert found.rows == sum(1 + 2 + k % 3 for k in range(40))
    dropped = dataset.split(faces, EDGES, 0, 0.2, 0.2, drop_conflicting=True)
    conflicting_rows = sum(1 + 2 + k % 3 for k in range(40) if k % 2)
    assert (
        len(dropped.train) + len(dropped.val) + len(dropped.test) == len(faces) - conflicting_rows
    )
    assert dropped.digest() != split.digest() and dropped.summary()["conflicting_dropped"]


def test_age_brackets() -> None:
    assert labels.bracket_names(EDGES) == ("0-3", "4-18", "19-45", "46-64", "65+")
    ages = np.array([0, 3, 4, 18, 19, 45, 46, 64, 65, 116])
    assert labels.age_bracket(ages, EDGES).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


@pytest.mark.integration
def test_real_csv_loads_and_caches(real_csv: Path, tmp_path: Path) -> None:
    beside = sorted(p.name for p in real_csv.parent.iterdir())
    faces = dataset.load(real_csv, tmp_path / "cache")
    assert len(faces) == 21783 and faces.images.shape[1:] == (48, 48)
    assert np.bincount(faces.ethnicity).tolist() == [9270, 4174, 3135, 3635, 1569]
    if not real_csv.parent.stat().st_mode & 0o222:  # a read-only copy (CI's) is left as it was
        assert sorted(p.name for p in real_csv.parent.iterdir()) == beside
    again = dataset.load(real_csv, tmp_path / "cache")
    assert np.array_equal(again.images, faces.images)
    assert pd.Series(faces.gender).value_counts().to_dict() == {0: 11366, 1: 10417}
