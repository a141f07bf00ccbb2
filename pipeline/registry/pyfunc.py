"""The logged model: an MLflow pyfunc that carries the network, its params, labels and preprocessing."""

from __future__ import annotations

import ast
import functools
import json
import re
import sys
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, Schema, TensorSpec

from pipeline.data import descriptor, inputs, labels
from pipeline.data.inputs import SEED_FORM, InputSpec
from pipeline.model import network
from pipeline.training import calibrate, train

# The layout of meta.json and weights.pt this code writes, and the ones it reads (versions
# registered before the field existed are faceopt/1). A change that older code would misread
# gets a new name: faceopt/2 added `flip_average`, which faceopt/1 readers would ignore;
# faceopt/3 added `members` (an ensemble's weights), which faceopt/2 readers could not load;
# faceopt/4 an input description with colour and face descriptors, whose versions take chips;
# faceopt/5 the kind of face features (faceopt/4 readers would feed dlib's 128-D descriptor).
FORMAT = "faceopt/5"
READS = ("faceopt/1", "faceopt/2", "faceopt/3", "faceopt/4", "faceopt/5")
CHIP = 200  # the side of UTKFace's chips and of the service's cut (pipeline.data.faces)


def metadata(
    params: dict,
    edges: tuple[int, ...],
    temperatures: dict[str, float] | None = None,
    precision: str = "fp32",
    flip_average: bool = False,
    members: int = 1,
    spec: InputSpec = SEED_FORM,
) -> dict:
    """Everything serving needs to rebuild the network and reproduce preprocessing, labels and
    calibrated probabilities (softmax of logits / temperature, per head, the logits averaged
    over an ensemble's `members` and with the mirror image's when `flip_average`). `precision`
    is what trained the weights; they are stored and run in fp32."""
    return {
        "format": FORMAT,
        "params": params,
        "members": members,
        "flip_average": flip_average,
        "trained_precision": precision,
        "age_edges": list(edges),
        "temperatures": {head: 1.0 for head in labels.HEADS} | (temperatures or {}),
        "classes": {head: list(names) for head, names in labels.class_names(edges).items()},
        "input": spec.to_meta(),
    }


# The modules MLflow runs when it loads the model; the pipeline modules they import follow.
ENTRY_MODULES = ("pipeline.registry.pyfunc_entry", "pipeline.registry.pyfunc")
ROOT = Path(__file__).parents[1]  # the pipeline package


def _source(module: str) -> Path | None:
    """The file of a pipeline module or package; None for a name inside one."""
    path = ROOT.joinpath(*module.split(".")[1:])
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(entry: tuple[str, ...] = ENTRY_MODULES) -> set[str]:
    """Top-level names of every module the model's code imports (read from its source, lazy
    imports included), following imports within the pipeline package."""
    todo, seen, found = list(entry), set(), set()
    while todo:
        name = todo.pop()
        source = _source(name)
        if name in seen or source is None:
            continue
        seen.add(name)
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
                if node.module.startswith("pipeline"):  # from pipeline.data import a, b
                    names += [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for module in names:
                if module.startswith("pipeline."):
                    todo.append(module)
                elif module.split(".")[0] not in ("pipeline", "__future__"):
                    found.add(module.split(".")[0])
    return found - set(sys.stdlib_module_names)


def requirements() -> list[str]:
    """pip requirements of the logged model: each distribution that provides a module its code
    imports, pinned to the installed version (a local build tag such as +cpu dropped)."""
    dists = set()
    for module in imported_modules():
        found = providers(module)
        if not found:
            raise RuntimeError(
                f"the model's code imports {module!r}, which no installed package provides"
            )
        dists.update(found)
    return sorted(f"{dist}=={importlib_metadata.version(dist).split('+')[0]}" for dist in dists)


def input_shape(spec: InputSpec) -> tuple[int, ...]:
    """What a version takes: 48x48 grayscale faces (the seed's form), else colour chips (square,
    UTKFace's 200x200 as the folder and the service give them)."""
    return (-1, -1, -1, 3) if spec.takes_chips else (-1, spec.size, spec.size)


def example(spec: InputSpec) -> np.ndarray:
    shape = (1, CHIP, CHIP, 3) if spec.takes_chips else (1, spec.size, spec.size)
    return np.full(shape, 128, dtype=np.uint8)


def providers(module: str) -> list[str]:
    """The installed distributions that provide top-level `module`."""
    return installed_providers().get(module, [])


# A module a distribution's file list makes importable: the top-level name of every .py file
# (`pkg/x/y.py,sha,size` -> pkg, `mod.py,...` -> mod), read from RECORD's text.
_RECORD_MODULE = re.compile(r"^([^/,\s]+?)(?:/[^,]*)?\.py,", re.MULTILINE)


@functools.cache
def installed_providers() -> dict[str, list[str]]:
    """Top-level module -> distributions, read once per process from each distribution's
    top_level.txt and file list (dlib-bin's top_level.txt names only its extension,
    _dlib_pybind11, not the dlib package it also installs). The file list is read as text:
    parsing every entry into a path took seconds in a full environment."""
    found: dict[str, list[str]] = {}
    for dist in importlib_metadata.distributions():
        modules = set((dist.read_text("top_level.txt") or "").split())
        record = dist.read_text("RECORD")
        if record is None:  # an egg-info install: its file list in another form
            modules |= {
                f.parts[0].removesuffix(".py") for f in dist.files or () if f.suffix == ".py"
            }
        else:
            modules |= set(_RECORD_MODULE.findall(record))
        for module in modules:
            found.setdefault(module, []).append(dist.metadata["Name"])
    return found


def signature(edges: tuple[int, ...], spec: InputSpec = SEED_FORM) -> ModelSignature:
    outputs = [ColSpec("string", head) for head in labels.HEADS]
    for head, names in labels.class_names(edges).items():
        outputs += [ColSpec("double", f"{head}:{name}") for name in names]
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), input_shape(spec))]),
        outputs=Schema(outputs),
    )


class FaceModel(PythonModel):
    """Faces in the version's input form (uint8 N x 48 x 48 grayscale, or N x S x S x 3 colour
    chips) -> per head the label and every class probability."""

    def load_context(self, context) -> None:
        self.load(Path(context.artifacts["meta"]), Path(context.artifacts["weights"]))

    def load(self, meta: Path, weights: Path) -> None:
        """The network from the version's two files: JSON and tensors only (weights_only), so
        loading runs none of the version's code, whoever wrote the files."""
        self.meta = json.loads(meta.read_text())
        found = self.meta.get("format", READS[0])
        if found not in READS:
            raise ValueError(
                f"model format {found!r}; this faceopt reads {', '.join(READS)}: serve it with "
                "the faceopt version that registered it, or retrain it with this one"
            )
        classes = {head: len(names) for head, names in self.meta["classes"].items()}
        state = torch.load(weights, map_location="cpu", weights_only=True)
        # The weights say how many networks there are; meta.json must agree before any is built.
        members = self.meta.get("members", 1)
        stored = len({key.split(".")[1] for key in state if key.startswith("members.")}) or 1
        if members != stored:
            raise ValueError(f"meta.json names {members!r} members, weights.pt holds {stored}")
        self.spec = InputSpec.from_meta(self.meta["input"])
        self.net = network.build(self.meta["params"], classes, members, self.spec)
        self.net.load_state_dict(state)
        self.net = network.fold_batch_norm(self.net.eval())

    @property
    def takes_chips(self) -> bool:
        return self.spec.takes_chips

    def probabilities(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Per head, calibrated class probabilities of faces in the version's input form: the
        48x48 grayscale faces themselves, or colour chips from which this derives its pixels
        and face descriptors exactly as training did."""
        if not self.spec.takes_chips:
            return self.probabilities_of(images, None)
        chips = np.asarray(images, dtype=np.uint8)
        pixels = inputs.chips_to_pixels(chips, self.spec) if self.spec.pixels else None
        found = (
            descriptor.compute(chips, self.spec.descriptor_kind) if self.spec.descriptor else None
        )
        return self.probabilities_of(pixels, found)

    @torch.inference_mode()
    def probabilities_of(
        self, pixels: np.ndarray | None, descriptors: np.ndarray | None
    ) -> dict[str, np.ndarray]:
        """Per head, calibrated class probabilities of inputs already in the version's form:
        pixels as the spec has them, and face features (N x D) when it uses them."""
        # The normalisation stored with the model, not today's constants.
        x = None
        if self.spec.pixels:  # a view (a mirror, a crop) too
            x = inputs.pixel_tensor(np.ascontiguousarray(pixels, dtype=np.uint8), self.spec)
        d = inputs.descriptor_tensor(descriptors, self.spec) if self.spec.descriptor else None
        logits = train.predict_logits(
            self.net, x, flip_average=self.meta.get("flip_average", False), d=d
        )
        # Models from before calibration have no temperatures: plain softmax.
        temperatures = self.meta.get("temperatures", {})
        return {
            head: calibrate.scaled_probabilities(logits[head], temperatures.get(head, 1.0))
            for head in labels.HEADS
        }

    # The hint (a type MLflow infers no schema from) keeps MLflow quiet; the signature is explicit.
    def predict(self, context, model_input: np.ndarray, params=None) -> pd.DataFrame:
        images = np.asarray(model_input)
        if self.spec.takes_chips:
            if images.ndim != 4 or images.shape[3] != 3 or images.shape[1] != images.shape[2]:
                raise ValueError(
                    f"expected colour face chips of shape (N, {CHIP}, {CHIP}, 3) (any square "
                    f"side), got {images.shape}"
                )
        elif images.ndim != 3 or images.shape[1:] != (self.spec.size, self.spec.size):
            size = self.spec.size
            raise ValueError(f"expected faces of shape (N, {size}, {size}), got {images.shape}")
        probs = self.probabilities(images)
        columns: dict[str, object] = {}
        for head, names in self.meta["classes"].items():
            columns[head] = [names[i] for i in probs[head].argmax(1)]
        for head, names in self.meta["classes"].items():
            for i, name in enumerate(names):
                columns[f"{head}:{name}"] = probs[head][:, i].astype(float)
        return pd.DataFrame(columns)
