"""Continuous batching for one model: a batch is formed when the model is free. Pure asyncio: no Ray, no torch.

Why not Ray Serve's ``@serve.batch`` (measured with Ray 2.60, ``benchmarks/RESULTS.md``): it forms the next batch
as soon as the previous one has been *dispatched*, not when it has finished. With ``batch_wait_timeout_s: 0`` it
therefore ran batches of one under load (37 req/s at concurrency 16, no better than one at a time); with a wait,
every lone request pays the wait. Here the worker takes whatever is queued only once the previous forward pass has
returned: under load the queue fills while the model runs, so batches fill by themselves, and a lone request is
run at once.
"""
from __future__ import annotations

import asyncio
import collections
from typing import Any, Awaitable, Callable, Optional


class ContinuousBatcher:
    """Run ``run_batch(items) -> results`` (one result per item, in order) over batches of submitted items.

    ``max_batch_size`` caps a batch; ``max_wait_s`` optionally waits that long for a batch to fill once the model
    is free (0: never wait). An exception from ``run_batch`` fails only that batch's items. An item whose caller
    has gone (its await cancelled) before its batch is formed is dropped, never run.
    """

    def __init__(self, run_batch: Callable[[list], Awaitable[list]], max_batch_size: int, max_wait_s: float = 0.0):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._queue: collections.deque = collections.deque()
        self._arrived: Optional[asyncio.Event] = None
        self._worker: Optional[asyncio.Task] = None

    async def submit(self, item: Any) -> Any:
        """Queue ``item`` for the next batch and return its result."""
        loop = asyncio.get_running_loop()
        if self._arrived is None:
            self._arrived = asyncio.Event()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work())
        future = loop.create_future()
        self._queue.append((item, future))
        self._arrived.set()
        return await future

    def _take(self) -> list:
        batch = []
        while self._queue and len(batch) < self.max_batch_size:
            item, future = self._queue.popleft()
            if not future.done():  # a cancelled caller's item is dropped
                batch.append((item, future))
        return batch

    async def _work(self) -> None:
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            while self._queue:
                if self.max_wait_s and len(self._queue) < self.max_batch_size:
                    await asyncio.sleep(self.max_wait_s)
                batch = self._take()
                if not batch:
                    continue
                try:
                    results = await self.run_batch([item for item, _ in batch])
                    if len(results) != len(batch):
                        raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
                except Exception as exc:  # this batch fails; the next one is unaffected
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), result in zip(batch, results):
                    if not future.done():
                        future.set_result(result)
