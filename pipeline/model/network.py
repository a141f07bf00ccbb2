"""Build the network from a plain params dict: a shared body and one linear head per task."""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from pipeline.data.inputs import SEED_FORM, InputSpec


class FaceNet(nn.Module):
    """Pixels through `body` and the face descriptor through `branch` (either may be absent),
    joined, through `trunk` -> features -> logits for age bracket, ethnicity and gender."""

    def __init__(
        self,
        body: nn.Module | None,
        features: int,
        classes: dict[str, int],
        branch: nn.Module | None = None,
        trunk: nn.Module | None = None,
    ):
        super().__init__()
        self.body = body
        self.branch = branch
        self.trunk = trunk or nn.Identity()  # no parameters: a pixels-only net keeps its keys
        self.heads = nn.ModuleDict({name: nn.Linear(features, n) for name, n in classes.items()})

    def forward(self, x: torch.Tensor | None, d: torch.Tensor | None = None) -> dict:
        parts = [self.body(x)] if self.body is not None else []
        if self.branch is not None:
            parts.append(self.branch(d))
        z = self.trunk(parts[0] if len(parts) == 1 else torch.cat(parts, 1))
        return {name: head(z) for name, head in self.heads.items()}


class Ensemble(nn.Module):
    """Networks of one architecture trained from different seeds, answering as one: the mean
    of their logits per head (the normalised geometric mean of their probabilities)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor | None, d: torch.Tensor | None = None) -> dict:
        outs = [member(x, d) for member in self.members]
        return {head: torch.stack([o[head].float() for o in outs]).mean(0) for head in outs[0]}


def input_spec(params: dict, form: InputSpec = SEED_FORM) -> InputSpec:
    """The input form of a network of `params` in a study whose faces come in `form`: the trial
    chose its features (pixels, descriptor or both); params without one are pixels-only."""
    return form.with_features(params.get("features", "pixels"))


def build(
    params: dict, classes: dict[str, int], members: int = 1, spec: InputSpec = SEED_FORM
) -> nn.Module:
    """The network for `params` (from space.suggest or a logged run) on inputs of form `spec`,
    with `classes` outputs per head; with members > 1, an Ensemble of that many such networks."""
    if members > 1:
        return Ensemble([build(params, classes, 1, spec) for _ in range(members)])
    arch = params.get("arch", "mlp")
    if arch == "mlp":
        net = _mlp_net(params, classes, spec)
    elif arch == "cnn":
        net = _cnn_net(params, classes, spec)
    else:
        raise ValueError(f"unknown arch {arch!r} in params; expected 'mlp' or 'cnn'")
    if spec.pixels and arch == "cnn":
        # oneDNN's convolutions are about 20% faster on CPU in channels-last; cuDNN's with AMP too.
        net = net.to(memory_format=torch.channels_last)
    return net


def _mlp_layers(params: dict, width: int) -> tuple[list[nn.Module], int]:
    """The seed's fully connected layers over `width` inputs."""
    layers: list[nn.Module] = []
    for i in range(params["num_fc_layers"]):
        out = params[f"fc_output_feat_{i}"]
        layers += [nn.Linear(width, out), nn.ReLU(), nn.Dropout(params[f"fc_dropout_{i}"])]
        width = out
    layers += [nn.Linear(width, params["last_fc"]), nn.ReLU()]
    return layers, params["last_fc"]


def _descriptor_norm(spec: InputSpec) -> list[nn.Module]:
    """Face features whose components differ in scale ("dlib-stages") are standardised by the
    network itself, so a version needs no statistics beside its weights; dlib's unit-length
    descriptor is only scaled (InputSpec.descriptor_scale), as versions that eat it were made."""
    return [] if spec.descriptor_kind == "dlib128" else [nn.BatchNorm1d(spec.descriptor_dim)]


def _branch(layers: list[nn.Module]) -> nn.Module:
    return nn.Sequential(*layers) if layers else nn.Identity()


def _mlp_net(params: dict, classes: dict[str, int], spec: InputSpec) -> FaceNet:
    """The seed's MLP over the flattened pixels, the face features, or both joined."""
    pixels = spec.size * spec.size * spec.channels
    if spec.features == "pixels":  # the seed's layout (and its state_dict keys)
        layers, features = _mlp_layers(params, pixels)
        return FaceNet(nn.Sequential(nn.Flatten(), *layers), features, classes)
    norm = _descriptor_norm(spec)
    if spec.features == "descriptor":
        layers, features = _mlp_layers(params, spec.descriptor_dim)
        return FaceNet(None, features, classes, branch=nn.Sequential(*norm, *layers))
    layers, features = _mlp_layers(params, pixels + spec.descriptor_dim)
    return FaceNet(
        nn.Flatten(), features, classes, branch=_branch(norm), trunk=nn.Sequential(*layers)
    )


def _cnn_net(params: dict, classes: dict[str, int], spec: InputSpec) -> FaceNet:
    """Conv body on the pixels, a fully connected branch on the face features, or both side by
    side."""
    body, features = _cnn_body(params, spec) if spec.pixels else (None, 0)
    branch = None
    if spec.descriptor:
        layers = _descriptor_norm(spec)
        width = spec.descriptor_dim
        hidden = params.get("descriptor_fc", 0)  # 0: they join the conv features as they are
        depth = params.get("descriptor_layers", 1) if hidden else 0
        dropout = params.get("descriptor_dropout", 0.0)
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        branch = _branch(layers)
        features += width
    return FaceNet(body, features, classes, branch=branch)


def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    # Batch norm makes the conv bias redundant.
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)]


class Residual(nn.Module):
    """Two 3x3 conv-BN layers and a skip connection (a 1x1 projection when widths differ)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(c_in, c_out), nn.ReLU(), *_conv_bn(c_out, c_out))
        self.skip = (
            nn.Identity()
            if c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


def _cnn_body(params: dict, spec: InputSpec) -> tuple[nn.Module, int]:
    """Stem, then `stages` stages of `blocks` blocks each (width doubling, 2x2 max pooling after
    each), global average pooling, dropout and an optional hidden layer."""
    width = params["width"]
    layers: list[nn.Module] = [*_conv_bn(spec.channels, width), nn.ReLU()]
    side = spec.size
    if params["stem_pool"]:
        layers.append(nn.MaxPool2d(2))
        side //= 2
    channels = width
    for stage in range(params["stages"]):
        out = width * 2**stage
        for _ in range(params["blocks"]):
            if params["block"] == "residual":
                layers.append(Residual(channels, out))
            else:
                layers += [*_conv_bn(channels, out), nn.ReLU()]
            channels = out
        if side >= 4:  # stop pooling at 3x3 or smaller
            layers.append(nn.MaxPool2d(2))
            side //= 2
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(params["dropout"])]
    features = channels
    if params["last_fc"]:
        layers += [nn.Linear(channels, params["last_fc"]), nn.ReLU(), nn.Dropout(params["dropout"])]
        features = params["last_fc"]
    return nn.Sequential(*layers), features


def fold_batch_norm(net: nn.Module) -> nn.Module:
    """For inference: every conv directly followed by batch norm becomes one conv with the norm's
    scale and shift folded into its weights (the same outputs, one op fewer). `net` must be in
    eval mode; it is changed in place and returned."""
    if net.training:
        raise ValueError("fold_batch_norm needs a network in eval mode (running statistics)")
    for module in net.modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module._modules.items())
        for (conv_name, conv), (bn_name, bn) in pairwise(children):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                module._modules[conv_name] = fuse_conv_bn_eval(conv, bn)
                module._modules[bn_name] = nn.Identity()
    return net
