"""The model-quality recipe: augmentation, learning-rate schedules, temperature scaling, presets."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import SecretStr

from pipeline import config
from pipeline.config import PRESETS, Settings
from pipeline.data import labels
from pipeline.model import augment, network, space
from pipeline.registry import package
from pipeline.tracking import runs
from pipeline.training import calibrate, train
from pipeline.tuning.study import read_enqueue
from serving.app import create_app
from tests.conftest import LOCAL, astronaut_face, jpeg, upload

EDGES = (0, 3, 18, 45, 64, 116)


def faces(n: int = 16, seed: int = 0) -> torch.Tensor:
    """Model inputs of random faces, with pixels 0 and 255 present so the range is reached."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, 1, 48, 48), generator=g, dtype=torch.uint8)
    pixels[:, :, 0, 0], pixels[:, :, 0, 1] = 0, 255
    return (pixels.float() / 255 - 0.5) / 0.25


@pytest.mark.parametrize(
    "policy",
    [
        augment.Policy(flip=True),
        augment.Policy(shift=4),
        augment.Policy(rotate=15),
        augment.Policy(jitter=0.2),
        augment.Policy(flip=True, shift=4, rotate=15, jitter=0.2),
    ],
)
def test_augmentation_keeps_shape_and_range_and_changes_the_batch(policy) -> None:
    x = faces()
    torch.manual_seed(0)
    out = augment.augment(x, policy)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= augment.LOW - 1e-6 and out.max() <= augment.HIGH + 1e-6
    assert not torch.equal(out, x)
    assert torch.isfinite(out).all()


def test_flip_only_mirrors_whole_images_and_the_zero_policy_is_the_identity() -> None:
    x = faces()
    torch.manual_seed(1)
    out = augment.augment(x, augment.Policy(flip=True))
    mirrored = [torch.equal(o, i.flip(2)) for o, i in zip(out, x, strict=True)]
    assert all(m or torch.equal(o, i) for m, o, i in zip(mirrored, out, x, strict=True))
    assert 0 < sum(mirrored) < len(x)  # some flipped, some not
    assert augment.augment(x, augment.Policy()) is x


def test_schedules_warm_up_then_decay() -> None:
    net = torch.nn.Linear(2, 2)
    for schedule, extra in [("onecycle", {}), ("cosine", {"warmup": 0.2})]:
        params = {"schedule": schedule, "lr": 0.1, **extra}
        opt = train.make_optimizer("SGD", net.parameters(), 0.1)
        sched = train.make_schedule(opt, params, total_steps=50)
        lrs = []
        for _ in range(50):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        peak = int(np.argmax(lrs))
        assert 0 < peak < 25 and lrs[peak] == pytest.approx(0.1, rel=0.05)
        assert lrs[0] < 0.05 and lrs[-1] < 0.01
    assert train.make_schedule(opt, {"lr": 0.1}, 10) is None  # the mlp recipe: constant lr


def test_loss_weights_and_label_smoothing_come_from_the_params() -> None:
    torch.manual_seed(0)
    logits = {h: 3 * torch.randn(8, n) for h, n in labels.num_classes(EDGES).items()}
    # Mostly right and confident, as a trained model is: smoothing then raises the loss clearly.
    y = {h: t.argmax(1) for h, t in logits.items()}
    y["age"][:2] = (y["age"][:2] + 1) % logits["age"].shape[1]
    plain = train.multitask_loss(logits, y)
    weighted = train.Loss.from_params({"loss_weight_age": 2.0, "loss_weight_gender": 0.0})
    expected = plain + torch.nn.functional.cross_entropy(logits["age"], y["age"])
    expected -= torch.nn.functional.cross_entropy(logits["gender"], y["gender"])
    assert weighted(logits, y).item() == pytest.approx(expected.item(), rel=1e-5)
    # Label smoothing eps: the target puts 1 - eps on the label and eps spread over all K
    # classes; by hand, per head, the mean over faces of -sum_k target_k * log softmax_k.
    eps, by_hand = 0.1, {}
    for head, z in logits.items():
        target = torch.full_like(z, eps / z.shape[1])
        target[torch.arange(len(z)), y[head]] += 1 - eps
        by_hand[head] = -(target * torch.log_softmax(z, dim=1)).sum(1).mean().item()
    smoothed = train.Loss.from_params({"label_smoothing": eps})(logits, y).item()
    assert smoothed == pytest.approx(sum(by_hand.values()), rel=1e-5)
    assert smoothed > plain.item() + 0.2  # measured: +0.69 with these logits
    both = train.Loss.from_params({"label_smoothing": eps, "loss_weight_ethnicity": 3.0})
    expected = by_hand["age"] + 3 * by_hand["ethnicity"] + by_hand["gender"]
    assert both(logits, y).item() == pytest.approx(expected, rel=1e-5)


def miscalibrated(n: int = 4000, sharpen: float = 3.0, seed: int = 0):
    """Labels drawn from softmax(z), with the model reporting z * sharpen: overconfident."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 5, generator=g) * 1.5
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)
    return z * sharpen, y


def test_temperature_scaling_lowers_nll_and_ece_on_a_miscalibrated_model() -> None:
    logits, y = miscalibrated()
    t = calibrate.fit_temperature(logits, y)
    assert t == pytest.approx(3.0, rel=0.15)  # it recovers the sharpening
    assert calibrate.nll(logits, y, t) < calibrate.nll(logits, y) - 0.1
    before = calibrate.ece(calibrate.scaled_probabilities(logits), y.numpy())
    after = calibrate.ece(calibrate.scaled_probabilities(logits, t), y.numpy())
    assert after < 0.03 < before
    # Fitted on one sample, it still helps on another from the same model (no overfitting).
    other, y2 = miscalibrated(seed=1)
    assert calibrate.nll(other, y2, t) < calibrate.nll(other, y2)


def test_ece_of_known_cases() -> None:
    always_right = np.eye(3)[[0, 1, 2, 0]]
    assert calibrate.ece(always_right, np.array([0, 1, 2, 0])) == 0.0
    # Confidence 0.9 everywhere, right half the time: ECE 0.4.
    probs = np.tile([0.9, 0.1], (10, 1))
    assert calibrate.ece(probs, np.array([0, 1] * 5)) == pytest.approx(0.4)


def test_presets_fill_defaults_and_explicit_settings_win(monkeypatch) -> None:
    cpu = Settings(preset="cpu")
    assert (cpu.space, cpu.pruner, cpu.study) == ("cnn-cpu", "hyperband", "faceopt-cpu")
    assert Settings(preset="gpu", epochs=3, study="mine").model_dump(
        include={"space", "epochs", "study"}
    ) == {"space": "cnn", "epochs": 3, "study": "mine"}
    monkeypatch.setenv("FACEOPT_TRAIN_EPOCHS", "7")
    assert Settings(preset="cpu").train_epochs == 7
    with pytest.raises(ValueError, match="preset"):
        Settings(preset="tpu")
    for name, values in PRESETS.items():  # every preset names a real space
        assert values["space"] in space.SPACES, name


def test_auto_is_the_devices_preset_from_its_known_good_points(monkeypatch, tmp_path: Path) -> None:
    """`make tune` without PRESET: the device's preset, its recipe's points only (a first
    champion soon), in the study that PRESET=cpu then tunes longer; the same on a folder."""
    monkeypatch.setattr(config, "device_preset", lambda: "cpu")
    auto, cpu = Settings(preset="auto"), Settings(preset="cpu")
    assert (auto.study, auto.space, auto.epochs) == (cpu.study, cpu.space, cpu.epochs)
    assert (auto.n_trials, auto.timeout) == (2, None) and cpu.timeout == 3600
    assert len(read_enqueue(auto.enqueue, auto.space, auto.features)) == auto.n_trials
    assert auto.enqueue.name == "cpu.json"
    folder = Settings(preset="auto", data=tmp_path)
    assert (folder.colour, folder.features, folder.enqueue.name) == (
        "rgb",
        "search",
        "cpu-folder.json",
    )
    assert len(read_enqueue(folder.enqueue, folder.space, folder.features)) == folder.n_trials
    # Another space or features than the preset's keep the preset's budgets but not its points
    # (`make tune DATA=folder FEATURES=both`: the descriptor-only point is not one of that).
    assert Settings(preset="cpu", space="mlp").enqueue is None
    assert Settings(preset="auto", data=tmp_path, features="both").enqueue is None
    assert Settings(preset="auto", data=tmp_path, features="search").enqueue == folder.enqueue
    assert Settings(preset="auto", features="pixels").enqueue == auto.enqueue
    monkeypatch.setattr(config, "device_preset", lambda: "gpu")
    assert Settings(preset="auto").model_dump(include={"study", "n_trials"}) == {
        "study": "faceopt-gpu",
        "n_trials": 20,
    }
    seed = Settings(preset="seed", data=tmp_path)  # the original experiment, on a folder too
    assert (seed.space, seed.sampler, seed.sampler_args, seed.pruner) == (
        "mlp",
        "skopt",
        {},
        "median",
    )
    assert (seed.input_size, seed.colour, seed.features) == (48, "gray", "pixels")


def register(net, temperatures: dict[str, float], settings: Settings, name: str) -> str:
    client = runs.client_for(settings.tracking_uri)
    experiment = runs.ensure_experiment(client, name, settings.artifact_root)
    run_id = client.create_run(experiment).info.run_id
    version = package.log_and_register(
        settings.tracking_uri, run_id, net, PARAMS, EDGES, temperatures, name
    )
    client.set_registered_model_alias(name, "champion", version.version)
    return str(version.version)


PARAMS = space.suggest(
    optuna.trial.FixedTrial(
        {"num_fc_layers": 4, "last_fc": 16, "optimizer": "Adam", "lr": 1e-3, "batch_size": 64}
        | {f"fc_output_feat_{i}": 16 for i in range(4)}
        | {f"fc_dropout_{i}": 0.0 for i in range(4)}
    ),
    "mlp",
)


def test_serving_applies_the_stored_temperatures(registered: Settings, tmp_path: Path) -> None:
    """The same network registered twice, with temperature 1 and with others: the served
    log-odds of the second are the first's divided by each head's temperature."""
    torch.manual_seed(0)
    net = network.build(PARAMS, labels.num_classes(EDGES))
    settings = registered.model_copy(
        update={
            "model_name": "tempered",
            "artifact_root": tmp_path,
            "reload_token": SecretStr("t"),
        }
    )
    register(net, {}, settings, "tempered")
    temperatures = {"age": 2.0, "ethnicity": 0.5, "gender": 3.0}
    with TestClient(create_app(settings), base_url=LOCAL) as c:

        def predict() -> dict:
            r = c.post("/predict", files=[upload("a.jpg", jpeg(astronaut_face()))])
            assert r.status_code == 200, r.text
            return r.json()["predictions"][0]

        plain_prediction = predict()
        version = register(net, temperatures, settings, "tempered")
        reloaded = c.post("/reload", headers={"Authorization": "Bearer t"})
        assert reloaded.json()["version"] == version
        served = [plain_prediction, predict()]
    for head, t in temperatures.items():
        plain, scaled = (np.log(list(p[head]["probabilities"].values())) for p in served)
        centred = (plain - plain.mean()) / t
        np.testing.assert_allclose(scaled - scaled.mean(), centred, rtol=1e-3, atol=1e-3)
        assert not math.isclose(np.ptp(plain), np.ptp(scaled))
