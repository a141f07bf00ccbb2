"""Dynamic batching: requests waiting together share one forward pass and get their own results."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from pipeline.config import Settings
from serving.batcher import Batcher
from serving.store import load


class Gated:
    """A real registered model whose passes are recorded and can be held until released."""

    def __init__(self, model, fail_on: int | None = None) -> None:
        self.model, self.fail_on = model, fail_on
        self.passes: list[int] = []
        self.started, self.release = threading.Event(), threading.Event()

    def probabilities(self, faces: np.ndarray) -> dict[str, np.ndarray]:
        self.passes.append(len(faces))
        self.started.set()
        self.release.wait(10)
        if len(self.passes) == self.fail_on:
            raise RuntimeError("forward failed")
        return self.model.probabilities(faces)


@pytest.fixture(scope="module")
def champion(registered: Settings):
    return load(registered.tracking_uri, "faces", "champion")


def faces(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 48, 48), dtype=np.uint8)


async def held_then_queued(batcher: Batcher, first, later: list) -> list:
    """Submit `first`, wait until its pass is running, queue `later` behind it, then let go."""
    gates = {id(job[0]): job[0] for job in [first, *later]}.values()
    tasks = [asyncio.create_task(batcher.probabilities(*first))]
    while not first[0].started.is_set():
        await asyncio.sleep(0.001)
    tasks += [asyncio.create_task(batcher.probabilities(*job)) for job in later]
    await asyncio.sleep(0.05)  # every later request is in the queue now
    for gate in gates:
        gate.release.set()
    return await asyncio.gather(*tasks, return_exceptions=True)


def expect_same(results: list, jobs: list, champion) -> None:
    for result, (_, x) in zip(results, jobs, strict=True):
        direct = champion.probabilities(x)
        for head, p in direct.items():
            assert result[head].shape == p.shape
            np.testing.assert_allclose(result[head], p, rtol=1e-4, atol=1e-6)


def run_batched(max_images: int, jobs: list, after: tuple | None = None) -> tuple[list, dict]:
    """`jobs` through a fresh batcher (the first held until the rest queue behind it), then
    `after` on its own; the results of each."""

    async def scenario():
        batcher = Batcher(max_images)
        await batcher.start()
        try:
            results = await held_then_queued(batcher, jobs[0], jobs[1:])
            alone = await batcher.probabilities(*after) if after else None
        finally:
            await batcher.stop()
        return results, alone

    return asyncio.run(scenario())


def test_requests_queued_behind_a_pass_share_the_next_one(champion) -> None:
    gate = Gated(champion)
    jobs = [(gate, faces(n, seed)) for seed, n in enumerate([2, 1, 3, 1, 4, 2])]
    results, alone = run_batched(64, jobs, after=(gate, faces(1, 99)))
    assert gate.passes == [2, 1 + 3 + 1 + 4 + 2, 1]  # the last, at light load, ran at once
    expect_same(results, jobs, champion)
    assert alone["age"].shape[0] == 1


def test_batches_stop_at_max_images_and_keep_order(champion) -> None:
    gate = Gated(champion)
    jobs = [(gate, faces(n, seed)) for seed, n in enumerate([1, 3, 1, 2, 6, 1])]
    results, _ = run_batched(4, jobs)
    # 3+1 fill a batch of 4; 2 then 6 would not fit; 6 alone is over the limit and runs alone.
    assert gate.passes == [1, 4, 2, 6, 1]
    expect_same(results, jobs, champion)


def test_each_request_keeps_its_own_model(champion) -> None:
    """After a reload, requests still holding the old model are not run by the new one."""
    old, new = Gated(champion), Gated(champion)
    jobs = [(old, faces(1, 0)), (new, faces(2, 1)), (old, faces(3, 2)), (new, faces(1, 3))]
    results, _ = run_batched(64, jobs)
    assert old.passes == [1, 3] and new.passes == [2 + 1]
    expect_same(results, jobs, champion)


def test_a_failed_pass_fails_its_requests_only(champion) -> None:
    gate = Gated(champion, fail_on=2)
    jobs = [(gate, faces(n, seed)) for seed, n in enumerate([1, 2, 2])]
    results, after = run_batched(64, jobs, after=(gate, faces(2, 7)))
    assert isinstance(results[0], dict)
    assert all(isinstance(r, RuntimeError) and "forward failed" in str(r) for r in results[1:])
    assert after["gender"].shape == (2, 2)


def test_a_stopped_batcher_says_so(champion) -> None:
    async def scenario():
        batcher = Batcher(max_images=8)
        with pytest.raises(RuntimeError, match="not running"):
            await batcher.probabilities(champion, faces(1, 0))

    asyncio.run(scenario())
