"""The PyTorch port of dlib's face-recognition ResNet against dlib itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from pipeline.data import descriptor, dlibnet
from tests.conftest import astronaut_face

# dlib and torch run the same float32 arithmetic in a different order (im2col + gemm against
# oneDNN, the affine layers folded into the convolutions): about 5e-7 apart on descriptors of
# norm ~1.4, so 1e-3 leaves a wide margin while still catching any wrong layer or weight.
TOL = 1e-3


@pytest.fixture(scope="module")
def net() -> dlibnet.DlibFaceNet:
    return dlibnet.load()


def chips() -> list[np.ndarray]:
    """200x200 face chips: the astronaut, mirrored, darker, and turned a little."""
    face = astronaut_face()
    return [
        np.asarray(c)
        for c in (
            face,
            ImageOps.mirror(face),
            ImageEnhance.Brightness(face).enhance(0.6),
            face.rotate(8, resample=Image.BILINEAR),
        )
    ]


@pytest.mark.slow
def test_matches_dlib(net: dlibnet.DlibFaceNet) -> None:
    faces = chips()
    expected = descriptor.reference(faces)
    x = dlibnet.to_input(np.stack([descriptor.net_chip(f) for f in faces]))
    with torch.inference_mode():
        found = net(x).numpy()
    assert found.shape == (len(faces), 128) and found.dtype == np.float32
    assert np.abs(found - expected).max() < TOL
    # and one at a time, unfused, in NCHW: the same network
    plain = dlibnet.load(fuse=False, channels_last=False)
    with torch.inference_mode():
        one = plain(x[:1]).numpy()
    assert np.abs(one - expected[:1]).max() < TOL


def test_file_holds_anet_type() -> None:
    parsed = dlibnet.parse(dlibnet.model_path().read_bytes())
    assert parsed.avg_rgb == tuple(np.float32(dlibnet.AVG_RGB).tolist())
    assert parsed.size == (150, 150)
    assert parsed.loss == pytest.approx({"margin": 0.04, "dist_thresh": 0.6})
    kinds = [lay.kind for lay in parsed.layers]
    assert kinds.count("con") == kinds.count("affine") == 29 and kinds[-1] == "fc"
    with pytest.raises(dlibnet.FormatError):
        dlibnet.parse(dlibnet.model_path().read_bytes()[:-1])


def test_to_input_is_dlibs_normalisation() -> None:
    chip = np.random.default_rng(0).integers(0, 256, (150, 150, 3), dtype=np.uint8)
    x = dlibnet.to_input(chip[None])
    assert x.shape == (1, 3, 150, 150)
    assert x[0, 1, 3, 7].item() == pytest.approx((chip[3, 7, 1] - 117.001) / 256, abs=1e-6)
    with pytest.raises(ValueError, match="150"):
        dlibnet.to_input(np.zeros((1, 200, 200, 3), np.uint8))


def test_add_zero_padded_puts_the_smaller_tensor_top_left() -> None:
    a = torch.ones(1, 2, 4, 4)
    b = torch.full((1, 3, 3, 3), 2.0)
    out = dlibnet.add_zero_padded(a, b)
    assert out.shape == (1, 3, 4, 4)
    assert out[0, 0, 0, 0] == 3 and out[0, 0, 3, 3] == 1 and out[0, 2, 0, 0] == 2
    assert out[0, 2, 3, 0] == 0
