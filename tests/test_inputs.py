"""Input forms: colour chips at a chosen size, dlib's face descriptor, and versions that record
what their network eats and are served by it."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from pipeline import train_best, tune
from pipeline.config import Settings
from pipeline.data import dataset, descriptor, faces, inputs, labels
from pipeline.data.inputs import SEED_FORM, InputSpec
from pipeline.evaluate import in_a_photo
from pipeline.model import network, space
from pipeline.registry import pyfunc
from serving.app import create_app
from tests.conftest import (
    LOCAL,
    REAL_DATA,
    astronaut_face,
    jpeg,
    make_settings,
    synthetic_faces,
    upload,
)

EDGES = (0, 3, 18, 45, 64, 116)
CLASSES = labels.num_classes(EDGES)
# Distance between two face features of one face, relative to their length. dlib calls faces
# within 0.6 the same person (its descriptor has unit length); on the sample photos the service's
# re-cut chip and the file's chip differ by a median 0.025 (at most 0.11) in dlib's descriptor,
# and by a median 0.008 (at most 0.04) in dlib-stages features, where two people differ by 0.14 or
# more.
SAME_CHIP = {"dlib128": 0.1, "dlib-stages": 0.04}


def distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(a, axis=-1)


def colour_folder(folder: Path, n: int, seed: int = 1) -> Path:
    """UTKFace-named 200x200 colour images whose colour, not only brightness, carries labels."""
    folder.mkdir()
    df = synthetic_faces(n, seed=seed)
    for row in df.itertuples():
        gray = np.array(row.pixels.split(), dtype=np.uint8).reshape(48, 48)
        rgb = np.stack([gray, gray, np.full_like(gray, 40 * row.ethnicity)], axis=-1)
        image = Image.fromarray(rgb).resize((200, 200))
        image.save(folder / f"{row.age}_{row.gender}_{row.ethnicity}_{row.img_name}")
    return folder


def test_colour_folder_decodes_to_the_stated_shape_and_is_cached(
    tmp_path: Path, monkeypatch
) -> None:
    folder = colour_folder(tmp_path / "UTKFace", 30)
    spec = InputSpec(64, "rgb")
    faces_ = dataset.load(folder, tmp_path / "c", spec=spec)
    assert faces_.images.shape == (30, 64, 64, 3) and faces_.images.dtype == np.uint8
    assert not np.array_equal(faces_.images[..., 0], faces_.images[..., 2])  # colour kept
    cached = sorted(p.name for p in (tmp_path / ".faceopt-cache").iterdir())  # beside the folder
    assert len(cached) == 1 and cached[0].endswith("-64rgb.npz")

    def no_decoding(*args):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(dataset, "_decode", no_decoding)
    again = dataset.load(folder, tmp_path / "c", spec=spec)
    assert np.array_equal(again.images, faces_.images) and again.files is not None
    monkeypatch.undo()
    # Every form of one folder has one split: the duplicate keys are the 48x48 gray conversion's.
    gray = dataset.load(folder, tmp_path / "c")
    assert gray.images.shape == (30, 48, 48)
    split = lambda f: dataset.split(f, EDGES, 0, 0.2, 0.2).digest()  # noqa: E731
    assert split(gray) == split(faces_)


def test_the_csv_refuses_forms_it_does_not_hold(faces_csv: Path, tmp_path: Path) -> None:
    for spec in (InputSpec(64), InputSpec(48, "rgb"), InputSpec(features="descriptor")):
        with pytest.raises(dataset.DataError, match="48x48 grayscale faces only.*DATA=/path/to"):
            dataset.load(faces_csv, tmp_path / "c", spec=spec)


@pytest.mark.parametrize("kind", sorted(descriptor.KINDS))
def test_descriptor_of_a_chip_agrees_between_training_and_the_service(
    tmp_path: Path, kind: str
) -> None:
    """The folder's path (the chip file) and the service's (the photo re-cut in colour) give one
    face the same features within SAME_CHIP; the service's 48x48 face stays what it was."""
    same = SAME_CHIP[kind]
    chip = tmp_path / "35_0_0_20170101000000000.jpg.chip.jpg"
    chip.write_bytes(jpeg(astronaut_face()))
    trained = descriptor.for_files([chip], kind)
    cut = faces.face_from_upload(chip.read_bytes(), 50_000_000, 0.15, colour=True)
    assert cut.chip.shape == (200, 200, 3)
    served = descriptor.compute([cut.chip], kind)
    assert trained.shape == (1, descriptor.dim(kind))
    assert distance(trained, served) < same
    # A stranger is far: the tolerance says something.
    other = descriptor.compute([np.asarray(Image.fromarray(cut.chip).rotate(180))], kind)
    assert distance(trained, other) > 3 * same
    gray = faces.face_from_upload(chip.read_bytes(), 50_000_000, 0.15)
    assert gray.chip is None and np.array_equal(gray.pixels, cut.pixels)
    # In a photo twice its size the face is found, cut twice (recut) in gray and in colour alike.
    photo = in_a_photo(chip.read_bytes(), 2.0)
    wide = faces.face_from_upload(photo, 50_000_000, 0.15, colour=True)
    wide_gray = faces.face_from_upload(photo, 50_000_000, 0.15)
    assert np.array_equal(wide.pixels, wide_gray.pixels) and wide.crop == wide_gray.crop
    assert distance(trained, descriptor.compute([wide.chip], kind)) < 2 * same


def test_stages_end_with_the_descriptor_of_the_face_and_its_mirror() -> None:
    """dlib-stages features hold dlib's own descriptor, averaged over the chip and its mirror."""
    chip = np.asarray(Image.open(io.BytesIO(jpeg(astronaut_face()))).convert("RGB"))
    stages = descriptor.compute([chip], "dlib-stages")[0]
    mirrored = descriptor.compute([chip, chip[:, ::-1]], "dlib128")
    assert np.allclose(stages[-descriptor.DIM :], mirrored.mean(0), atol=1e-5)
    assert not np.allclose(mirrored[0], mirrored[1], atol=1e-3)  # the mirror is another input


@pytest.mark.integration
@pytest.mark.parametrize("kind", sorted(descriptor.KINDS))
def test_descriptor_paths_agree_on_real_photos(kind: str) -> None:
    files = sorted((REAL_DATA / "utkface_sample").glob("*.jpg"))[:30]
    if not files:
        pytest.skip("no ../shared/data/utkface_sample")
    trained = descriptor.for_files(files, kind)
    cuts = [faces.face_from_upload(f.read_bytes(), 50_000_000, 0.15, colour=True) for f in files]
    assert all(c.chip is not None for c in cuts)
    found = distance(trained, descriptor.compute([c.chip for c in cuts], kind))
    assert np.median(found) < SAME_CHIP[kind] / 2 and found.max() < 2.5 * SAME_CHIP[kind]


@pytest.mark.parametrize("space_name", ["mlp", "cnn-cpu"])
@pytest.mark.parametrize("features", ["pixels", "descriptor", "both"])
def test_every_space_builds_a_network_for_every_input(space_name: str, features: str) -> None:
    params = space.suggest(
        optuna.trial.FixedTrial(_fixed(space_name, features)), space_name, features
    )
    spec = network.input_spec(params, InputSpec(40, "rgb", "both"))
    assert spec.features == features
    net = network.build(params, CLASSES, spec=spec).eval()
    x = torch.rand(3, 3, 40, 40) if spec.pixels else None
    d = torch.rand(3, spec.descriptor_dim) if spec.descriptor else None
    out = net(x, d)
    assert {h: tuple(o.shape) for h, o in out.items()} == {h: (3, n) for h, n in CLASSES.items()}
    if features == "descriptor":  # the pixels play no part
        assert net.body is None
    # params from before features existed are pixels-only
    assert network.input_spec({"arch": "mlp"}, InputSpec(40, "rgb", "both")).features == "pixels"


def _fixed(space_name: str, features: str) -> dict:
    """A complete point of the space: sampled once from a study that records what was asked."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    space.suggest(trial, space_name, features)
    return trial.params


def test_a_version_from_before_input_forms_still_loads(tmp_path: Path) -> None:
    """faceopt/3's meta.json ("input" without colour or features) is the seed's form."""
    params = space.suggest(optuna.trial.FixedTrial(_fixed("cnn-cpu", "pixels")), "cnn-cpu")
    net = network.build(params, CLASSES).eval()
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    meta = pyfunc.metadata(params, EDGES) | {"format": "faceopt/3"}
    meta["input"] = {"size": 48, "mode": "L", "mean": 0.5, "std": 0.25}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    model = pyfunc.FaceModel()
    model.load(tmp_path / "meta.json", tmp_path / "weights.pt")
    assert model.spec == SEED_FORM and not model.takes_chips
    faces48 = np.random.default_rng(0).integers(0, 256, (4, 48, 48), dtype=np.uint8)
    with torch.inference_mode():
        logits = net(inputs.pixel_tensor(faces48, SEED_FORM))
    probs = model.probabilities(faces48)
    for head in labels.HEADS:
        assert np.array_equal(probs[head].argmax(1), logits[head].argmax(1).numpy())


def test_a_version_of_dlibs_descriptor_still_eats_it(tmp_path: Path) -> None:
    """faceopt/4's meta.json before descriptor kinds ("input" without descriptor_kind) is a
    version of dlib's 128-D descriptor, scaled as it was, and is served that way."""
    params = space.suggest(
        optuna.trial.FixedTrial(_fixed("mlp", "descriptor")), "mlp", "descriptor"
    )
    old = InputSpec(features="descriptor", descriptor_kind="dlib128")
    net = network.build(params, CLASSES, spec=old).eval()
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    meta = pyfunc.metadata(params, EDGES) | {"format": "faceopt/4"}
    meta["input"] = {k: v for k, v in old.to_meta().items() if k != "descriptor_kind"}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    model = pyfunc.FaceModel()
    model.load(tmp_path / "meta.json", tmp_path / "weights.pt")
    assert model.spec == old and model.takes_chips
    chip = np.asarray(Image.open(io.BytesIO(jpeg(astronaut_face()))).convert("RGB"))
    with torch.inference_mode():
        logits = net(None, torch.from_numpy(descriptor.compute([chip], "dlib128")) * 10)
    probs = model.probabilities(chip[None])
    for head in labels.HEADS:
        assert np.array_equal(probs[head].argmax(1), logits[head].argmax(1).numpy())


@pytest.fixture(scope="module")
def descriptor_version(registered: Settings, tmp_path_factory) -> Settings:
    """A version of another model that eats the face descriptor, in the same stores as the
    session's 48x48 grayscale `registered` champion."""
    tmp = tmp_path_factory.mktemp("descriptor")
    folder = colour_folder(tmp / "UTKFace", 60)
    settings = make_settings(tmp, folder).model_copy(
        update={
            "storage": registered.storage,
            "tracking_uri": registered.tracking_uri,
            "artifact_root": registered.artifact_root,
            "study": "descriptor-study",
            "model_name": "faces-descriptor",
            "space": "mlp",
            "features": "descriptor",
            "n_trials": 1,
            "train_epochs": 2,
        }
    )
    tune.run(settings)
    train_best.run(settings)
    return settings


@pytest.mark.slow
def test_a_gray_and_a_descriptor_version_served_side_by_side(
    registered: Settings, descriptor_version: Settings
) -> None:
    photo = jpeg(astronaut_face())
    answers = {}
    for settings in (registered, descriptor_version):
        with TestClient(create_app(settings), base_url=LOCAL) as client:
            loaded = client.app.state.store.current
            r = client.post("/predict", files=[upload("a.jpg", photo)])
            assert r.status_code == 200, r.text
            assert client.get("/model").json()["input"] == loaded.model.spec.to_meta()
            answers[settings.model_name] = (loaded, r.json()["predictions"][0])
    gray, gray_answer = answers["faces"]
    desc, desc_answer = answers["faces-descriptor"]
    assert gray.model.spec == SEED_FORM and not gray.takes_chips
    assert desc.model.spec.features == "descriptor" and desc.takes_chips
    assert desc.model.meta["format"] == "faceopt/5" and desc.model.meta["input"]["features"]
    # Each answer is its version's on what the service cut: the gray face, or the colour chip
    # through the descriptor.
    cut = faces.face_from_upload(photo, 50_000_000, 0.15, colour=True)
    for model, answer, given in ((gray, gray_answer, cut.pixels), (desc, desc_answer, cut.chip)):
        expected = model.probabilities(given[None])
        for head in labels.HEADS:
            served = [answer[head]["probabilities"][c] for c in model.classes[head]]
            np.testing.assert_allclose(served, expected[head][0], atol=1e-5)
    # The pyfunc of the descriptor version takes chips, as its signature says.
    with pytest.raises(ValueError, match=r"colour face chips of shape \(N, 200, 200, 3\)"):
        desc.model.predict(None, np.zeros((1, 48, 48), dtype=np.uint8))
