"""The continuous batcher (pure asyncio): batches form when the model is free, never by waiting."""
import asyncio
import time

import pytest

from genderid.batching import ContinuousBatcher


def run(coro):
    return asyncio.run(coro)


def test_a_lone_request_runs_at_once_and_load_forms_full_batches():
    sizes = []

    async def model(items):
        sizes.append(len(items))
        await asyncio.sleep(0.05)  # the forward pass: requests keep arriving meanwhile
        return [i * 2 for i in items]

    async def scenario():
        batcher = ContinuousBatcher(model, max_batch_size=8)
        started = time.perf_counter()
        assert await batcher.submit(1) == 2
        alone = time.perf_counter() - started
        results = await asyncio.gather(*(batcher.submit(i) for i in range(20)))
        return alone, results

    alone, results = run(scenario())
    assert alone < 0.08  # no batching wait: one forward pass (0.05 s) and nothing more
    assert results == [i * 2 for i in range(20)]  # every caller gets its own result, in order
    assert sizes == [1, 8, 8, 4]  # the lone one, then the 20 that queued together fill batches of 8


def test_a_failing_batch_fails_only_its_own_items():
    calls = []

    async def model(items):
        calls.append(list(items))
        await asyncio.sleep(0.01)
        if "bad" in items:
            raise ValueError("boom")
        return items

    async def scenario():
        batcher = ContinuousBatcher(model, max_batch_size=2)
        first = asyncio.ensure_future(batcher.submit("a"))
        await asyncio.sleep(0)  # "a" runs alone; the next two share a batch, the last runs after
        rest = [asyncio.ensure_future(batcher.submit(x)) for x in ("bad", "b", "c")]
        return await asyncio.gather(first, *rest, return_exceptions=True)

    a, bad, b, c = run(scenario())
    assert a == "a" and c == "c"
    assert isinstance(bad, ValueError) and isinstance(b, ValueError)  # they shared the failing batch
    assert calls == [["a"], ["bad", "b"], ["c"]]


def test_a_cancelled_callers_item_is_never_run():
    ran = []

    async def model(items):
        ran.extend(items)
        await asyncio.sleep(0.05)
        return items

    async def scenario():
        batcher = ContinuousBatcher(model, max_batch_size=4)
        busy = asyncio.ensure_future(batcher.submit("busy"))
        await asyncio.sleep(0.01)
        gone = asyncio.ensure_future(batcher.submit("gone"))
        kept = asyncio.ensure_future(batcher.submit("kept"))
        await asyncio.sleep(0.01)
        gone.cancel()  # the client went away while the model was busy
        return await busy, await kept

    assert run(scenario()) == ("busy", "kept")
    assert ran == ["busy", "kept"]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        ContinuousBatcher(lambda items: items, max_batch_size=0)
