"""Benchmarks: each module prints a markdown table and keeps it under bench/results/."""

from __future__ import annotations

import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def save(kind: str, text: str) -> Path:
    """Write `text` to bench/results/<kind>-<date>-<time>.md and say where."""
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.md"
    out.write_text(text.rstrip("\n") + "\n")
    print(f"written to {out}")
    return out
