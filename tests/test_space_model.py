from __future__ import annotations

import math

import optuna
import pytest
import torch

from pipeline.data import labels
from pipeline.model import network, space
from pipeline.training import train
from pipeline.tuning import samplers
from pipeline.tuning.samplers import PROPOSAL_ATTR

CLASSES = labels.num_classes((0, 3, 18, 45, 64, 116))


def extreme_params(name: str, high: bool) -> dict:
    """Every parameter of a space at its low or high end, through the space's own suggest()."""
    if name == "mlp":
        n = 8 if high else 4
        fixed = {"num_fc_layers": n, "last_fc": 64 if high else 8}
        fixed |= {f"fc_output_feat_{i}": 64 if high else 8 for i in range(n)}
        fixed |= {f"fc_dropout_{i}": 0.5 if high else 0.0 for i in range(n)}
        fixed |= {"optimizer": "SGD", "lr": 1e-2 if high else 1e-4}
        return space.suggest(
            optuna.trial.FixedTrial(fixed | {"batch_size": 256 if high else 32}), name
        )
    ranges = space.CNN_RANGES[name]
    end = max if high else min
    fixed = {
        "width": end(ranges.widths),
        "stages": end(ranges.stages),
        "blocks": end(ranges.blocks),
        "block": "residual" if high else "plain",
        "stem_pool": ranges.stem_pool[0] if high else ranges.stem_pool[-1],  # (False, True)
        "dropout": 0.5 if high else 0.0,
        "last_fc": 256 if high else 0,
        "flip": high,
        "shift": 4 if high else 0,
        "rotate": 15.0 if high else 0.0,
        "jitter": 0.2 if high else 0.0,
        "label_smoothing": 0.2 if high else 0.0,
        "weight_decay": 5e-2 if high else 1e-5,
        "schedule": "cosine" if high else "onecycle",
        "warmup": 0.2,
        "optimizer": "SGD" if high else "AdamW",
        "lr": 1e-1 if high else 3e-4,
        "batch_size": 256 if high else 64,
    } | {f"loss_weight_{h}": 2.0 if high else 0.5 for h in ("age", "ethnicity", "gender")}
    return space.suggest(optuna.trial.FixedTrial(fixed), name)


@pytest.mark.parametrize("name", ["mlp", "cnn", "cnn-cpu"])
@pytest.mark.parametrize("high", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_model_builds_and_trains_at_the_extremes(name: str, high: bool) -> None:
    params = extreme_params(name, high)
    net = network.build(params, CLASSES)
    out = net(torch.rand(3, 1, 48, 48))
    assert {h: tuple(t.shape) for h, t in out.items()} == {
        "age": (3, 5),
        "ethnicity": (3, 5),
        "gender": (3, 2),
    }
    out["age"].sum().backward()  # gradients flow through the whole body
    # And the whole recipe (augmentation, schedule, weighted smoothed loss) runs a step.
    x = torch.randn(4, 1, 48, 48)
    data = train.Tensors(x, {h: torch.zeros(4, dtype=torch.long) for h in out})
    history = train.fit(net, params | {"batch_size": 2}, data, data, epochs=1, seed=0)
    assert math.isfinite(history[0]["train_loss"])


@pytest.mark.parametrize("name", ["mlp", "cnn", "cnn-cpu"])
@pytest.mark.parametrize("high", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_folding_batch_norm_keeps_the_outputs(name: str, high: bool) -> None:
    torch.manual_seed(0)
    net = network.build(extreme_params(name, high), CLASSES)
    for _ in range(3):  # running statistics and affine weights far from their initial values
        net(torch.rand(8, 1, 48, 48) * 3 + 1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 2)
            m.bias.data.uniform_(-1, 1)
    net.eval()
    x = torch.rand(5, 1, 48, 48)
    with torch.inference_mode():
        before = net(x)
        folded = network.fold_batch_norm(net)
        after = folded(x)
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert norms == 0
    for head, logits in before.items():
        torch.testing.assert_close(after[head], logits, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="eval mode"):
        network.fold_batch_norm(network.build(extreme_params(name, high), CLASSES))


def test_unknown_space_and_arch_are_named() -> None:
    with pytest.raises(ValueError, match="unknown search space 'rnn'"):
        space.suggest(optuna.trial.FixedTrial({}), "rnn")
    with pytest.raises(ValueError, match="unknown arch 'rnn'"):
        network.build({"arch": "rnn"}, CLASSES)


def mixed_space(trial: optuna.Trial) -> float:
    """Every parameter kind: int, int log, int step, float, float log, float step, categorical,
    plus conditional ones, on top of the real mlp space."""
    params = space.suggest_mlp(trial)
    trial.suggest_int("int_log", 1, 1000, log=True)
    trial.suggest_int("int_step", 0, 30, step=5)
    trial.suggest_float("float_step", 0.0, 1.0, step=0.25)
    trial.suggest_categorical("mixed", [None, 1, "two", 3.5])
    if trial.suggest_categorical("branch", ["a", "b"]) == "a":
        trial.suggest_float("only_a", -1.0, 1.0)
    return params["lr"] * 100 + params["last_fc"] / 64 - params["num_fc_layers"] / 8


@pytest.mark.parametrize(
    "name",
    [
        "tpe",
        "random",
        *(pytest.param(n, marks=pytest.mark.slow) for n in ("skopt", "gp")),
        "cmaes",
        "qmc",
    ],
)
def test_every_sampler_proposes_in_bounds(name: str) -> None:
    kwargs = {"n_initial_points": 3} if name == "skopt" else {}
    study = optuna.create_study(
        direction="maximize", sampler=samplers.make_sampler(name, seed=0, **kwargs)
    )
    study.optimize(mixed_space, n_trials=12)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    for t in study.trials:
        for param, dist in t.distributions.items():
            assert dist._contains(dist.to_internal_repr(t.params[param])), (param, t.params[param])
        n = t.params["num_fc_layers"]
        assert {f"fc_output_feat_{i}" for i in range(n)} <= t.params.keys()
        assert f"fc_output_feat_{n}" not in t.params
    if name == "skopt":  # after its initial points it really asks scikit-optimize
        asked = [t for t in study.trials if PROPOSAL_ATTR in t.system_attrs]
        assert len(asked) >= 10
        t = asked[-1]
        proposal = t.system_attrs[PROPOSAL_ATTR]
        shared = [p for p in proposal if p in t.params]
        assert shared and all(t.params[p] == proposal[p] for p in shared)


def test_skopt_options_are_checked() -> None:
    with pytest.raises(ValueError, match="base_estimator 'XX'"):
        samplers.make_sampler("skopt", 0, base_estimator="XX")
    with pytest.raises(ValueError, match="bad sampler arguments for 'tpe'"):
        samplers.make_sampler("tpe", 0, nonsense=1)
    with pytest.raises(ValueError, match="unknown pruner 'x'"):
        samplers.make_pruner("x", 5)


@pytest.mark.slow  # seconds each: scikit-learn and scikit-optimize fit their models
@pytest.mark.parametrize("estimator", ["ET", "RF", "GP", "GBRT"])
def test_skopt_estimators_and_acquisitions(estimator: str) -> None:
    sampler = samplers.make_sampler(
        "skopt",
        1,
        base_estimator=estimator,
        n_initial_points=2,
        acq_func="EI",
        acq_func_kwargs={"xi": 0.02},
        consider_pruned_trials=True,
    )
    study = optuna.create_study(sampler=sampler)
    study.optimize(
        lambda t: (t.suggest_float("x", -2, 2) - 1) ** 2 + t.suggest_int("k", 0, 3), n_trials=8
    )
    # Every trial after the first (whose search space is still empty) is the skopt model's
    # proposal with this estimator, not a random fallback.
    asked = [t for t in study.trials if PROPOSAL_ATTR in t.system_attrs]
    assert len(study.trials) == 8 and len(asked) == 7
    for t in asked:
        assert t.params == pytest.approx(t.system_attrs[PROPOSAL_ATTR])


def test_flip_averaging_sees_a_face_and_its_mirror_alike(tmp_path) -> None:
    """Averaged logits are the mean of the face's and its mirror's, so a face and its mirror get
    the same answer; a faceopt/1 version (no flip_average) keeps plain logits."""
    import json

    import numpy as np

    from pipeline.registry import pyfunc

    torch.manual_seed(0)
    params = extreme_params("cnn-cpu", False)
    net = network.build(params, CLASSES).eval()
    x = torch.rand(6, 1, 48, 48)
    with torch.inference_mode():
        averaged = train.predict_logits(net, x, flip_average=True)
        mirrored = train.predict_logits(net, x.flip(-1), flip_average=True)
        plain, flipped = net(x), net(x.flip(-1))
    for head in averaged:
        torch.testing.assert_close(averaged[head], (plain[head] + flipped[head]) / 2)
        torch.testing.assert_close(mirrored[head], averaged[head], rtol=1e-5, atol=1e-5)

    weights = tmp_path / "weights.pt"
    torch.save(net.state_dict(), weights)
    faces = np.random.default_rng(0).integers(0, 256, (4, 48, 48), dtype=np.uint8)
    answers = {}
    for name, meta in {
        "flip": pyfunc.metadata(params, (0, 3, 18, 45, 64, 116), flip_average=True),
        "v1": {  # what faceopt/1 wrote: no format, no flip_average
            k: v
            for k, v in pyfunc.metadata(params, (0, 3, 18, 45, 64, 116)).items()
            if k not in ("format", "flip_average")
        },
    }.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(meta))
        model = pyfunc.FaceModel()
        model.load(tmp_path / f"{name}.json", weights)
        answers[name] = (model.probabilities(faces), model.probabilities(faces[:, :, ::-1]))
    for head in labels.HEADS:
        np.testing.assert_allclose(answers["flip"][0][head], answers["flip"][1][head], atol=1e-5)
        assert not np.allclose(answers["v1"][0][head], answers["v1"][1][head], atol=1e-5)


def test_an_ensemble_answers_with_its_members_mean_logits(tmp_path) -> None:
    """network.build(members=3) averages its members' logits; registered as faceopt/3 metadata
    with one state dict, the pyfunc rebuilds all three members (batch norm folded) and answers
    the same calibrated probabilities."""
    import json

    import numpy as np

    from pipeline.data import preprocess
    from pipeline.registry import pyfunc
    from pipeline.training import calibrate

    torch.manual_seed(0)
    params = extreme_params("cnn-cpu", False)
    ensemble = network.build(params, CLASSES, members=3)
    assert isinstance(ensemble, network.Ensemble) and len(ensemble.members) == 3
    for member in ensemble.members:  # non-trivial batch-norm statistics to fold
        for module in member.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    ensemble.eval()
    faces = np.random.default_rng(1).integers(0, 256, (5, 48, 48), dtype=np.uint8)
    x = preprocess.to_model_input(faces)
    with torch.inference_mode():
        mean = ensemble(x)
        each = [member(x) for member in ensemble.members]
    for head in labels.HEADS:
        torch.testing.assert_close(mean[head], sum(e[head] for e in each) / 3)
        assert not torch.allclose(each[0][head], each[1][head])  # the members differ

    temperatures = {"age": 1.5, "ethnicity": 0.8, "gender": 1.2}
    meta = pyfunc.metadata(params, (0, 3, 18, 45, 64, 116), temperatures, members=3)
    assert meta["format"] == "faceopt/5" and meta["members"] == 3
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    torch.save(ensemble.state_dict(), tmp_path / "weights.pt")
    model = pyfunc.FaceModel()
    model.load(tmp_path / "meta.json", tmp_path / "weights.pt")
    assert len(model.net.members) == 3
    served = model.probabilities(faces)
    for head in labels.HEADS:
        expected = calibrate.scaled_probabilities(mean[head], temperatures[head])
        np.testing.assert_allclose(served[head], expected, rtol=1e-4, atol=1e-5)

    # A meta.json that does not match its weights is refused before anything is built.
    (tmp_path / "meta.json").write_text(json.dumps(meta | {"members": 10**6}))
    with pytest.raises(ValueError, match="names 1000000 members, weights.pt holds 3"):
        pyfunc.FaceModel().load(tmp_path / "meta.json", tmp_path / "weights.pt")
