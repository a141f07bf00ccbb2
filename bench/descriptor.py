"""The face descriptor's cost: dlib-bin's own network against its torch port (pipeline.data.dlibnet)
on the same chips, interleaved in one run, one thread each: milliseconds per face for one face and
in a batch of 32, the ratio, and how far apart their descriptors are.

`python -m bench.descriptor --chips ../shared/data/utkface_sample` (any folder of face chips).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from bench import save
from pipeline.data import descriptor
from pipeline.testkit import machine

# dlib's own 128-D descriptor computed by the port: the same work as dlib's (compute's default,
# "dlib-stages", is 832-D and runs the network on each chip's mirror image too).
port = partial(descriptor.compute, kind="dlib128")


def ms_per_face(fn: Callable[[list], np.ndarray], chips: list, repeats: int) -> list[float]:
    """One timing per repeat (after a warm-up call), in milliseconds per face."""
    fn(chips)
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn(chips)
        out.append(1000 * (time.perf_counter() - started) / len(chips))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chips", type=Path, default=Path("../shared/data/utkface_sample"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-save", action="store_true", help="print only (tests)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    files = sorted(args.chips.glob("*.jpg"))[:32]
    chips = [descriptor.read_chip(f) for f in files]
    ours, dlib_ = port(chips), descriptor.reference(chips)
    distance = np.linalg.norm(ours - dlib_, axis=1)
    rows = []
    for batch in (1, 32):
        part = chips[:batch]
        timings = {"dlib": [], "torch": []}
        for _ in range(args.repeats):  # interleaved, so both see the same machine
            timings["dlib"] += ms_per_face(descriptor.reference, part, 1)
            timings["torch"] += ms_per_face(port, part, 1)
        median = {k: statistics.median(v) for k, v in timings.items()}
        rows.append((len(part), median["dlib"], median["torch"], median["dlib"] / median["torch"]))
    lines = [
        f"# Face descriptor: dlib-bin against its torch port, {len(chips)} chips of {args.chips}, "
        f"one thread of {machine()}, {time.strftime('%Y-%m-%d')}",
        "",
        "| faces per call | dlib ms/face | torch ms/face | dlib / torch |",
        "| --- | --- | --- | --- |",
        *(f"| {b} | {d:.1f} | {t:.1f} | {r:.1f}x |" for b, d, t, r in rows),
        "",
        f"Euclidean distance between the two descriptors of a chip: at most {distance.max():.1e} "
        f"(dlib counts faces within 0.6 as one person). Medians of {args.repeats} interleaved "
        "repeats.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_save:
        save("descriptor", text)


if __name__ == "__main__":
    main()
