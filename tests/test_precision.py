"""Training precision and memory format: chosen per device and setting, and never visible in
what the model answers once it is stored and served in fp32."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
import torch
from pydantic import ValidationError

from pipeline.config import Settings
from pipeline.data import labels, preprocess
from pipeline.model import network, space
from pipeline.registry import package
from pipeline.tracking import runs
from pipeline.training import calibrate, train
from tests.conftest import copy_sqlite, empty_mlflow_store

EDGES = (0, 3, 18, 45, 64, 116)
CLASSES = labels.num_classes(EDGES)
CNN = space.suggest(
    optuna.trial.FixedTrial(
        {
            "width": 16,
            "stages": 3,
            "blocks": 1,
            "block": "residual",
            "stem_pool": True,
            "dropout": 0.0,
            "last_fc": 0,
            "flip": False,
            "shift": 0,
            "rotate": 0.0,
            "jitter": 0.0,
            "label_smoothing": 0.0,
            "weight_decay": 1e-4,
            "schedule": "onecycle",
            "optimizer": "AdamW",
            "lr": 3e-3,
            "batch_size": 64,
        }
        | {f"loss_weight_{h}": 1.0 for h in labels.HEADS}
    ),
    "cnn-cpu",
)


@pytest.mark.parametrize(
    ("device", "choice", "native", "cuda_bf16", "expected"),
    [
        ("cpu", "auto", True, False, "bf16"),
        ("cpu", "auto", False, False, "fp32"),
        ("cpu", "fp32", True, False, "fp32"),
        ("cpu", "bf16", False, False, "bf16"),  # asked for: given, even if emulated
        ("cuda", "auto", False, True, "bf16"),
        ("cuda", "auto", False, False, "fp16"),
        ("cuda", "fp32", False, True, "fp32"),
        ("mps", "auto", True, False, "fp32"),
    ],
)
def test_precision_follows_the_device_and_the_setting(
    monkeypatch, device: str, choice: str, native: bool, cuda_bf16: bool, expected: str
) -> None:
    monkeypatch.setattr(train, "native_bf16_cpu", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
    assert train.select_precision(torch.device(device), choice).name == expected


def test_impossible_or_unknown_precisions_are_refused(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        train.select_precision(torch.device("cpu"), "fp16")
    with pytest.raises(ValueError, match="not supported by this GPU"):
        train.select_precision(torch.device("cuda"), "bf16")
    with pytest.raises(ValueError, match="expected auto, fp32, bf16 or fp16"):
        train.select_precision(torch.device("cpu"), "half")
    monkeypatch.setenv("FACEOPT_PRECISION", "bf16")
    assert Settings().precision == "bf16"
    monkeypatch.setenv("FACEOPT_PRECISION", "int8")
    with pytest.raises(ValidationError, match="precision"):
        Settings()


# /proc/cpuinfo excerpts: x86 lists its features under "flags", Arm under "Features".
X86 = "processor\t: 0\nmodel name\t: x\nflags\t\t: fpu sse sse2 avx avx2 fma {}\nbugs\t\t: spectre_v1\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull crc32 {}\n"


@pytest.mark.parametrize(
    ("cpuinfo", "native"),
    [
        (X86.format("avx512f avx512bw avx512_bf16"), True),  # AMD Zen 4, Intel Cooper Lake
        (X86.format("avx512f avx512bw amx_bf16 amx_tile"), True),  # Intel Sapphire Rapids
        (X86.format("avx512f avx512bw avx512_vnni"), False),  # Intel Ice Lake
        (X86.format(""), False),
        (ARM.format("asimddp sve i8mm bf16"), True),  # Neoverse V1
        (ARM.format("asimddp sve i8mm"), False),
        ("", False),
    ],
)
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path: Path, cpuinfo: str, native: bool) -> None:
    """Fixed cpuinfo texts, two processors' worth (the flags are per processor), with and
    without bf16 in hardware; without a cpuinfo file (not Linux), fp32."""
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo + cpuinfo.replace("processor\t: 0", "processor\t: 1"))
    assert train.native_bf16_cpu(path) is native
    assert train.native_bf16_cpu(tmp_path / "missing") is False


def test_channels_last_does_not_change_the_outputs() -> None:
    torch.manual_seed(0)
    last = network.build(CNN, CLASSES)
    assert last.body[0].weight.is_contiguous(memory_format=torch.channels_last)
    plain = network.build(CNN, CLASSES).to(memory_format=torch.contiguous_format)
    plain.load_state_dict(last.state_dict())
    assert plain.body[0].weight.is_contiguous()
    x = torch.randn(6, 1, 48, 48)
    for mode in ("train", "eval"):
        getattr(last, mode)(), getattr(plain, mode)()
        a, b = last(x), plain(x)
        for head in labels.HEADS:
            torch.testing.assert_close(a[head], b[head], rtol=1e-4, atol=1e-5)


def faces(n: int, seed: int) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """uint8 faces whose brightness carries the gender, so a few epochs learn something."""
    rng = np.random.default_rng(seed)
    gender = rng.integers(0, 2, n)
    images = rng.integers(0, 120, (n, 48, 48)) + 100 * gender[:, None, None]
    y = {
        "age": torch.as_tensor(rng.integers(0, 5, n)),
        "ethnicity": torch.as_tensor(rng.integers(0, 5, n)),
        "gender": torch.as_tensor(gender),
    }
    return images.astype(np.uint8), y


@pytest.mark.slow
def test_bf16_trained_weights_are_served_in_fp32_with_the_training_evaluation(
    tmp_path: Path,
) -> None:
    """A network trained under bf16 autocast keeps fp32 weights; registered and loaded through
    its pyfunc, it gives the probabilities of train-best's own (fp32) evaluation, and within a
    bf16 rounding of the bf16 validation that tune reported."""
    images, y = faces(128, 0)
    data = train.Tensors(preprocess.to_model_input(images), y)
    train.seed_everything(0)
    net = network.build(CNN, CLASSES)
    bf16 = train.Precision(torch.bfloat16)
    history = train.fit(net, CNN, data, data, epochs=3, seed=0, precision=bf16)
    assert history[-1]["val_gender_acc"] > 0.9, history[-1]  # it learned, under bf16
    assert all(p.dtype == torch.float32 for p in net.parameters())

    test_images, _ = faces(40, 1)
    x = preprocess.to_model_input(test_images)
    fp32_logits = train.predict_logits(net, x)
    bf16_logits = train.predict_logits(net, x, bf16)
    temperatures = {"age": 1.5, "ethnicity": 1.0, "gender": 0.8}

    copy_sqlite(empty_mlflow_store(), tmp_path / "mlflow.db")  # MLflow's migrations run once
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = runs.client_for(uri)
    experiment = runs.ensure_experiment(client, "precision", tmp_path / "mlruns")
    run_id = client.create_run(experiment).info.run_id
    version = package.log_and_register(uri, run_id, net, CNN, EDGES, temperatures, "p", "bf16")
    loaded = mlflow.pyfunc.load_model(f"models:/p/{version.version}")
    served = loaded.predict(test_images)
    assert loaded.unwrap_python_model().meta["trained_precision"] == "bf16"
    names = labels.class_names(EDGES)
    for head, t in temperatures.items():
        probs = served[[f"{head}:{name}" for name in names[head]]].to_numpy()
        expected = calibrate.scaled_probabilities(fp32_logits[head], t)
        np.testing.assert_allclose(probs, expected, atol=1e-4)
        rounded = calibrate.scaled_probabilities(bf16_logits[head], t)
        np.testing.assert_allclose(probs, rounded, atol=0.05)
