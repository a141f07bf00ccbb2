"""Dynamic batching: the faces of every request waiting at once go through the network together.

One forward pass of N faces costs less than N passes of one (the per-call overhead is paid once;
on 2 CPU cores the cnn-cpu champion takes ~1.6 ms a face at batch 8 against 2.3 ms alone, and a
GPU gains far more). The batcher adds no waiting: a request that
finds the network idle runs at once, alone; requests that arrive while a pass is running queue up
and all go in the next one. Under load the batches grow by themselves, at light load nothing waits.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from serving.store import Loaded

log = logging.getLogger(__name__)


@dataclass
class _Job:
    model: Loaded
    faces: np.ndarray
    done: asyncio.Future


class Batcher:
    """Queue of faces to run; one task takes everything queued and runs it in a single pass."""

    def __init__(self, max_images: int) -> None:
        self.max_images = max_images
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        # One thread runs the network: passes never overlap or compete for torch's threads.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self._task: asyncio.Task | None = None
        self._held: _Job | None = None  # taken from the queue but did not fit the last batch

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def probabilities(self, model: Loaded, faces: np.ndarray) -> dict[str, np.ndarray]:
        """Per head, class probabilities of `faces` (N x 48 x 48 uint8) by `model`."""
        if self._task is None or self._task.done():
            raise RuntimeError("the batcher is not running")
        job = _Job(model, faces, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(job)
        return await job.done

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._take()
            # A reload between requests: each request keeps the model it started with.
            for model in {id(job.model): job.model for job in batch}.values():
                jobs = [job for job in batch if job.model is model]
                await self._forward(loop, model, jobs)

    async def _take(self) -> list[_Job]:
        """The first waiting job (waiting for one if need be) and every other that fits."""
        first = self._held or await self._queue.get()
        self._held = None
        batch, size = [first], len(first.faces)
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if size + len(job.faces) > self.max_images:
                self._held = job
                break
            batch.append(job)
            size += len(job.faces)
        return batch

    async def _forward(self, loop: asyncio.AbstractEventLoop, model: Loaded, jobs: list[_Job]):
        faces = np.concatenate([job.faces for job in jobs])
        try:
            probs = await loop.run_in_executor(self._executor, model.probabilities, faces)
        except Exception as e:  # one bad pass fails its requests, not the batcher
            log.exception("forward pass of %d faces failed", len(faces))
            for job in jobs:
                if not job.done.done():
                    job.done.set_exception(e)
            return
        start = 0
        for job in jobs:
            stop = start + len(job.faces)
            if not job.done.done():  # the client may have gone away meanwhile
                job.done.set_result({head: p[start:stop] for head, p in probs.items()})
            start = stop
