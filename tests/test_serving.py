from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from mlflow.tracking import MlflowClient
from PIL import Image
from pydantic import SecretStr

from pipeline import train_best
from pipeline.config import Settings
from pipeline.evaluate import in_a_photo
from serving.app import create_app
from tests.conftest import LOCAL, REAL_DATA, astronaut_face, jpeg, upload

SAMPLES = REAL_DATA / "utkface_sample"


def image_bytes(fmt: str = "JPEG", size=(200, 200), frames: int = 1) -> bytes:
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        for _ in range(frames)
    ]
    buf = io.BytesIO()
    if frames > 1:
        images[0].save(buf, format=fmt, save_all=True, append_images=images[1:])
    else:
        images[0].save(buf, format=fmt)
    return buf.getvalue()


def flat_png(size: tuple[int, int]) -> bytes:
    """A PNG of one colour: many pixels in few bytes."""
    buf = io.BytesIO()
    Image.new("RGB", size, (90, 90, 90)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def client(registered: Settings):
    with TestClient(create_app(registered), base_url=LOCAL) as c:
        yield c


def test_single_and_multi_file_predictions(client: TestClient) -> None:
    one = client.post("/predict", files=[upload("a.jpg", jpeg(astronaut_face()))])
    assert one.status_code == 200, one.text
    body = one.json()
    assert body["model"] == {"name": "faces", "version": "1", "alias": "champion"}
    (p,) = body["predictions"]
    assert p["filename"] == "a.jpg" and set(p) >= {"face_detected", "face_box", "crop"}
    assert p["face_detected"] is True
    assert set(p["age"]["probabilities"]) == {"0-3", "4-18", "19-45", "46-64", "65+"}
    assert set(p["ethnicity"]["probabilities"]) == {"White", "Black", "Asian", "Indian", "Other"}
    assert set(p["gender"]["probabilities"]) == {"male", "female"}
    for head in ("age", "ethnicity", "gender"):
        probs = p[head]["probabilities"]
        assert sum(probs.values()) == pytest.approx(1, abs=1e-4)
        assert p[head]["label"] == max(probs, key=probs.get)

    many = client.post(
        "/predict", files=[upload(f"{i}.jpg", image_bytes(size=(200 + i, 200))) for i in range(5)]
    )
    assert many.status_code == 200
    assert [q["filename"] for q in many.json()["predictions"]] == [f"{i}.jpg" for i in range(5)]
    single_field = client.post("/predict", files=[upload("b.jpg", image_bytes(), field="file")])
    assert single_field.status_code == 200 and len(single_field.json()["predictions"]) == 1


@pytest.mark.parametrize(
    ("fmt", "mime", "frames"),
    [
        ("PNG", "image/png", 1),
        ("WEBP", "image/webp", 1),
        ("BMP", "image/bmp", 1),
        ("GIF", "image/gif", 3),
        ("MPO", "image/jpeg", 2),  # a phone's JPEG with a second picture
    ],
)
def test_image_formats(client: TestClient, fmt: str, mime: str, frames: int) -> None:
    r = client.post(
        "/predict", files=[upload(f"x.{fmt.lower()}", image_bytes(fmt, frames=frames), mime=mime)]
    )
    assert r.status_code == 200, r.text


def test_no_face_no_answer(client: TestClient) -> None:
    flat = io.BytesIO()
    Image.new("RGB", (300, 200), (128, 128, 128)).save(flat, format="PNG")
    files = [upload("wide.png", flat.getvalue()), upload("face.jpg", jpeg(astronaut_face()))]
    r = client.post("/predict", files=files)
    assert r.status_code == 200, r.text
    none, face = r.json()["predictions"]
    assert none["face_detected"] is False and none["face_box"] is None
    assert none["age"] is None and none["ethnicity"] is None and none["gender"] is None
    assert none["crop"] == {"x": 50, "y": 0, "width": 200, "height": 200, "angle": 0.0}
    assert face["face_detected"] is True and face["age"]["label"]  # the other file is answered


def test_faces_in_photos_are_cut_where_they_were_put(registered: Settings) -> None:
    """A face crop put into a larger photo is found and cut back out where it was put; a face
    under min_face of the shorter side is found only when min_face is lowered."""
    face = jpeg(astronaut_face())
    for min_face in (0.3, 0.15):
        with TestClient(
            create_app(registered.model_copy(update={"min_face": min_face})), base_url=LOCAL
        ) as c:
            for scale in (1.0, 2.0, 5.5):  # the face box is ~90%, 45% and 16% of the photo
                raw = face if scale == 1 else in_a_photo(face, scale)
                r = c.post("/predict", files=[upload("photo.jpg", raw)])
                assert r.status_code == 200, r.text
                (p,) = r.json()["predictions"]
                if min_face == 0.3 and scale == 5.5:
                    assert not p["face_detected"] and p["age"] is None
                    continue
                at = round(100 * (scale - 1))  # where the 200x200 face was put, in x and y
                crop = p["crop"]
                assert p["face_detected"], (min_face, scale)
                assert abs(crop["x"] - at) <= 4 and abs(crop["y"] - at) <= 4, (scale, crop)
                assert abs(crop["width"] - 200) <= 4 and abs(crop["angle"]) < 1, crop


def test_bad_uploads_get_4xx_json_and_the_service_stays_up(registered: Settings) -> None:
    limits = registered.model_copy(
        update={"max_file_bytes": 60_000, "max_files": 2, "max_pixels": 300 * 300}
    )
    jpeg = image_bytes()
    cases = [
        ([upload("notes.txt", b"hello, not an image", mime="text/plain")], 415, "notes.txt"),
        ([upload("broken.jpg", jpeg[: len(jpeg) // 3])], 415, "broken.jpg"),
        # A format Pillow knows but the service does not take: refused before any decoder.
        (
            [upload("scan.tif", image_bytes("TIFF", size=(64, 64)), mime="image/tiff")],
            415,
            "not a JPEG, PNG",
        ),
        (
            [
                upload(
                    "huge.png",
                    image_bytes("PNG", size=(200, 120)) + b"\0" * 60_000,
                    mime="image/png",
                )
            ],
            413,
            "huge.png",
        ),
        ([upload(f"{i}.jpg", jpeg) for i in range(3)], 413, "more than 2 files"),
        (
            [upload("bomb.png", flat_png((400, 300)), mime="image/png")],
            413,
            "bomb.png",
        ),
        ([upload("empty.jpg", b"")], 422, "empty.jpg"),
        ([], 422, "no image"),
    ]
    with TestClient(create_app(limits), base_url=LOCAL) as c:
        for files, status, text in cases:
            r = c.post("/predict", files=files) if files else c.post("/predict")
            assert r.status_code == status, (text, r.text)
            assert text in r.json()["detail"]
        assert c.get("/health").json()["status"] == "ok"
        assert c.post("/predict", files=[upload("ok.jpg", jpeg)]).status_code == 200
        metrics = c.get("/metrics").text
    assert 'faceopt_requests_total{route="/predict",status="415"} 3.0' in metrics
    assert 'faceopt_requests_total{route="/predict",status="413"} 3.0' in metrics
    assert "faceopt_request_seconds_bucket" in metrics
    assert "faceopt_images_per_request_count 1.0" in metrics


def test_monitoring_counts_what_the_model_answers(client: TestClient) -> None:
    """Per head the predicted classes and the winning probability, and the photos without a
    face, labelled with the version: they move with every answer."""
    from skimage import data as skdata

    def samples(text: str, name: str) -> dict[str, float]:
        return {
            line.split(" ")[0]: float(line.split(" ")[1])
            for line in text.splitlines()
            if line.startswith(name)
        }

    face = jpeg(astronaut_face())
    body = client.post("/predict", files=[upload("a.jpg", face), upload("b.jpg", face)]).json()
    gender = body["predictions"][0]["gender"]["label"]
    cup = io.BytesIO()
    Image.fromarray(skdata.coffee()).save(cup, format="JPEG")
    assert not client.post("/predict", files=[upload("cup.jpg", cup.getvalue())]).json()[
        "predictions"
    ][0]["face_detected"]
    text = client.get("/metrics").text
    predicted = samples(text, "faceopt_predictions_total")
    assert (
        predicted[f'faceopt_predictions_total{{head="gender",label="{gender}",version="1"}}'] >= 2
    )
    assert sum(v for k, v in predicted.items() if 'head="age"' in k) >= 2
    confidence = samples(text, "faceopt_prediction_confidence_count")
    assert confidence['faceopt_prediction_confidence_count{head="ethnicity",version="1"}'] >= 2
    assert samples(text, "faceopt_no_face_total")['faceopt_no_face_total{version="1"}'] >= 1


def test_model_info(client: TestClient, registered: Settings) -> None:
    info = client.get("/model").json()
    assert info["version"] == "1" and info["age_edges"] == list(registered.age_edges)
    assert set(info["test_metrics"]) >= {"test_age_acc", "test_gender_f1"}
    assert info["labels"]["gender"] == ["male", "female"]
    assert client.get("/").status_code == 200 and "faceopt" in client.get("/").text
    assert "/predict" in client.get("/openapi.json").json()["paths"]


def test_no_champion_then_reload(registered: Settings, tmp_path: Path) -> None:
    """Start on an empty store: 503s that say what to do; after registering, /reload serves it."""
    empty = registered.model_copy(
        update={
            "tracking_uri": f"sqlite:///{tmp_path / 'empty.db'}",
            "artifact_root": tmp_path / "m",
            "reload_token": SecretStr("s3cret"),
        }
    )
    auth = {"Authorization": "Bearer s3cret"}
    with TestClient(create_app(empty), base_url=LOCAL) as c:
        for r in (c.get("/ready"), c.post("/predict", files=[upload("a.jpg", image_bytes())])):
            assert r.status_code == 503
            assert (
                "no champion registered" in r.json()["detail"]
                and "make train-best" in r.json()["detail"]
            )
        assert c.get("/health").status_code == 200
        assert c.post("/reload", headers=auth).status_code == 503
        train_best.run(empty)  # the same study, registered into the empty store
        assert c.post("/reload", headers=auth).json()["version"] == "1"
        assert c.get("/ready").status_code == 200
        assert c.post("/predict", files=[upload("a.jpg", image_bytes())]).status_code == 200


def test_reload_swaps_versions_and_a_failed_reload_keeps_the_old(registered: Settings) -> None:
    guarded = registered.model_copy(update={"reload_token": SecretStr("s3cret")})
    client = MlflowClient(registered.tracking_uri)
    with TestClient(create_app(guarded), base_url=LOCAL) as c:
        before = c.get("/model").json()["version"]
        new = train_best.run(registered, promote=True)
        assert c.post("/reload").status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert c.post("/reload", headers=auth).json()["version"] == new.version != before
        assert c.get("/model").json()["version"] == new.version

        # A champion whose files are gone: the reload fails, says why, and the old one serves on.
        broken = train_best.run(registered, promote=True)
        source = client.get_model_version("faces", broken.version).source
        model_id = source.removeprefix("models:/")
        logged = client.get_logged_model(model_id).artifact_location.removeprefix("file://")
        shutil.rmtree(logged)
        r = c.post("/reload", headers=auth)
        assert r.status_code == 503 and f"still serving version {new.version}" in r.json()["detail"]
        assert c.get("/model").json()["version"] == new.version
        assert (
            c.post("/predict", files=[upload("a.jpg", image_bytes())]).json()["model"]["version"]
            == new.version
        )
    client.set_registered_model_alias("faces", "champion", "1")  # leave the module's store as found


def clone_version(registered: Settings, tmp: Path, edit) -> str:
    """Register a copy of version 1's files, changed by edit(copy_dir); its version number."""
    client = MlflowClient(registered.tracking_uri)
    v1 = client.get_model_version("faces", "1")
    logged = client.get_logged_model(v1.source.removeprefix("models:/"))
    copy = tmp / "copy"
    shutil.copytree(logged.artifact_location.removeprefix("file://"), copy)
    edit(copy)
    return str(client.create_model_version("faces", str(copy), v1.run_id).version)


def wait_for_version(c: TestClient, version: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while c.get("/model").json()["version"] != version:
        assert time.time() < deadline, f"version {version} not served within {timeout} s"
        time.sleep(0.05)


def test_the_service_runs_no_code_from_the_registry(registered: Settings, tmp_path: Path) -> None:
    """A version whose model code would write a file on import is served from its weights and
    JSON alone; a version in a format this code does not know is refused, saying so."""
    marker = tmp_path / "ran"
    trap = f"open({str(marker)!r}, 'w').write('code from the artifact store ran')\n"

    def booby_trap(copy: Path) -> None:
        for source in copy.rglob("*.py"):  # the models-from-code entry and code_paths
            source.write_text(trap + source.read_text())

    def future_format(copy: Path) -> None:
        meta = json.loads((copy / "artifacts" / "meta.json").read_text())
        (copy / "artifacts" / "meta.json").write_text(json.dumps(meta | {"format": "faceopt/9"}))

    client = MlflowClient(registered.tracking_uri)
    trapped = clone_version(registered, tmp_path / "a", booby_trap)
    future = clone_version(registered, tmp_path / "b", future_format)
    guarded = registered.model_copy(update={"reload_token": SecretStr("s3cret")})
    auth = {"Authorization": "Bearer s3cret"}
    try:
        with TestClient(create_app(guarded), base_url=LOCAL) as c:
            client.set_registered_model_alias("faces", "champion", trapped)
            assert c.post("/reload", headers=auth).json()["version"] == trapped
            answer = c.post("/predict", files=[upload("a.jpg", image_bytes())])
            assert answer.status_code == 200 and not marker.exists()

            client.set_registered_model_alias("faces", "champion", future)
            r = c.post("/reload", headers=auth)
            assert r.status_code == 503 and "'faceopt/9'" in r.json()["detail"]
            assert "faceopt/1" in r.json()["detail"]
            assert c.get("/model").json()["version"] == trapped
    finally:
        client.set_registered_model_alias("faces", "champion", "1")


def test_the_alias_watcher_follows_and_survives_a_bad_version(
    registered: Settings, tmp_path: Path
) -> None:
    def break_weights(copy: Path) -> None:
        (copy / "artifacts" / "weights.pt").write_bytes(b"not torch")

    client = MlflowClient(registered.tracking_uri)
    good = clone_version(registered, tmp_path / "good", lambda copy: None)
    bad = clone_version(registered, tmp_path / "bad", break_weights)
    watching = registered.model_copy(update={"watch_alias": 0.05})
    try:
        with TestClient(create_app(watching), base_url=LOCAL) as c:
            assert c.get("/model").json()["version"] == "1"
            client.set_registered_model_alias("faces", "champion", good)
            wait_for_version(c, good)
            client.set_registered_model_alias("faces", "champion", bad)
            time.sleep(1)  # many polls: each one sees the moved alias; the bad version fails once
            assert c.get("/model").json()["version"] == good
            answer = c.post("/predict", files=[upload("a.jpg", image_bytes())])
            assert answer.status_code == 200 and answer.json()["model"]["version"] == good
            client.set_registered_model_alias("faces", "champion", "1")
            wait_for_version(c, "1")
    finally:
        client.set_registered_model_alias("faces", "champion", "1")


def test_form_errors_are_the_services_json_error(client: TestClient) -> None:
    """FastAPI's own 422 (a text part where a file belongs) has the documented `detail` string,
    and a field the document does not list is refused, not ignored."""
    image = upload("a.jpg", image_bytes())
    r = client.post("/predict", files=[("files", (None, b"null"))])
    assert r.status_code == 422 and isinstance(r.json()["detail"], str)
    assert "files.0: expected an image file" in r.json()["detail"]
    r = client.post("/predict", files=[image], data={"name": "me"})
    assert r.status_code == 422 and "unexpected form fields ['name']" in r.json()["detail"]
    body = client.get("/openapi.json").json()["components"]["schemas"]["Body_predict_predict_post"]
    assert body["additionalProperties"] is False and "null" not in str(body)
