"""`make bench`: pipeline benchmarks, each a median of repeats with min and max, as ratios
against a baseline measured in the same run. Prints a markdown table and writes it to
bench/results/."""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pipeline import data

RESULTS = Path(__file__).parent / "results"


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def fmt(times: list[float]) -> str:
    return f"{statistics.median(times):.3f} s (min {min(times):.3f}, max {max(times):.3f})"


def bench_load(path: Path, repeats: int) -> list[tuple[str, str, str]]:
    """First load (decode, into an empty cache) against the cached load of the same file."""
    with tempfile.TemporaryDirectory() as tmp:
        caches = iter(range(repeats))
        # A fresh cache folder per repeat, so every "first" load really decodes.
        first = timed(lambda: data.load(path, Path(tmp) / str(next(caches))), repeats)
        cached = timed(lambda: data.load(path, Path(tmp) / "0"), repeats * 2)
    ratio = statistics.median(first) / statistics.median(cached)
    return [
        ("data load: first (decode + cache)", fmt(first), "baseline"),
        ("data load: cached", fmt(cached), f"{ratio:.0f}x faster"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/age_gender.csv.gz"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not args.data.exists():
        raise SystemExit(data.missing_data_message(args.data))
    rows = bench_load(args.data, args.repeats)
    table = "\n".join(
        ["| benchmark | median (min, max) | vs baseline |", "| --- | --- | --- |"]
        + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    )
    print(table)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.md"
    out.write_text(f"data: {args.data}\n\n{table}\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
