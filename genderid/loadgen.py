"""Drive an HTTP endpoint with N concurrent clients from one asyncio loop (aiohttp, which ships with Ray).

One process and no thread per client, so the load generator costs little CPU next to what it measures. Used by
``benchmarks/serve_throughput.py`` and the endpoint's load test. No Ray.
"""
from __future__ import annotations

import asyncio
import time


def percentile_ms(seconds: list[float], q: float) -> float:
    """The ``q`` quantile of durations in seconds, in milliseconds (nan when empty)."""
    values = sorted(seconds)
    return 1000 * values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def _drive(url: str, body: bytes, content_type: str, concurrency: int, seconds: float) -> dict:
    import aiohttp

    answers: list[tuple[int, float]] = []
    failed = 0
    deadline = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def client():
            nonlocal failed
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers={"Content-Type": content_type}) as answer:
                        await answer.read()
                        answers.append((answer.status, time.perf_counter() - started))
                except aiohttp.ClientError:
                    failed += 1

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    ok = [t for status, t in answers if status == 200]
    other = [t for status, t in answers if status != 200]
    return {"rps": len(ok) / elapsed, "ok": len(ok), "p50_ms": percentile_ms(ok, 0.5),
            "p99_ms": percentile_ms(ok, 0.99), "rejected": len(other),
            "rejected_statuses": sorted({s for s, _ in answers if s != 200}),
            "rejected_p50_ms": percentile_ms(other, 0.5), "failed": failed}


def drive(url: str, body: bytes, concurrency: int, seconds: float, content_type: str = "image/jpeg") -> dict:
    """``concurrency`` clients POSTing ``body`` to ``url`` back to back for ``seconds``.

    Returns requests/s of 200 answers, their p50/p99 ms, how many got another status (which, and their p50 ms),
    and how many failed without an answer.
    """
    return asyncio.run(_drive(url, body, content_type, concurrency, seconds))
