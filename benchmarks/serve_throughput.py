"""Serving throughput, measured against the raw predictor in the same run (not a test).

Part 1: the pure Predictor's images/s at batch 1 and 16 with 1 torch thread (the CPU budget of one replica with
        num_cpus 1), its achieved GFLOP/s, and this CPU's 1-thread fp32 matmul peak measured the same way.
Part 2: one replica (serve_config.yaml, autoscaling pinned to 1 replica, the same 1 thread) at concurrency 1 and
        16: how close serving gets to the raw model (p50 at 1 vs the raw batch-1 forward; requests/s at 16 vs the
        raw batch-16 images/s), with the replica's own per-stage times from its metrics.
Part 3: the shipped serve_config.yaml as it is (autoscaling on) at concurrency 8, 32 and 64, and far past its
        queue (concurrency 512): requests/s of 200 answers, latency, and how fast the excess gets its 503.

    python benchmarks/serve_throughput.py [--width 0.25] [--size 108x88] [--seconds 8] [--no-pin]

With --pin (the default) the raw predictor of part 1 and the replica of part 2 run on the same dedicated core (the
last), and everything else (Serve's proxy, Ray's processes, this load generator) on the others: the same CPU budget
for both, as the comparison needs. Part 3 is not pinned.

The load generator is one asyncio process (aiohttp, which ships with Ray): it costs little CPU next to the
replica, unlike a thread per client. Prints a Markdown section to paste into benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def matmul_peak_gflops(threads: int, n: int = 1024, repeats: int = 20) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2.0 * n ** 3 * repeats / (time.perf_counter() - started) / 1e9


def predictor_images_per_s(predictor, image: bytes, batch: int, seconds: float) -> float:
    arrays = predictor.preprocess([image] * batch)
    predictor.batch_size = batch
    predictor.predict_arrays(arrays)
    started, images = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        predictor.predict_arrays(arrays)
        images += batch
    return images / (time.perf_counter() - started)


def pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of process ``pid`` to ``cpus`` (threads it starts later inherit it)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cpus)
        except (ProcessLookupError, PermissionError, OSError):
            pass


def ray_pids() -> list[int]:
    """This machine's Ray processes (raylet, GCS, proxy, workers) and this one."""
    pids = [os.getpid()]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"ray" in cmdline:
                pids.append(int(entry.name))
    return pids


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each thread of process ``pid``, keyed by its OS name: the
    replica's ``forward_0`` and ``decode_N`` (:func:`genderid.serve_app.name_os_thread`), Ray's own threads
    (``worker.io``, ``client.poll`` ...), and the Python threads Ray and Serve start, which all show the title
    the process had when they started (``ray::IDLE``), told apart by their thread id."""
    ticks = os.sysconf("SC_CLK_TCK")
    used: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        used[f"{name} [{task.name}]"] = (int(fields[11]) + int(fields[12])) / ticks
    return used


def thread_kinds(ms_per_request: dict[str, float]) -> dict[str, float]:
    """Per-thread figures grouped for the table: our threads by role, each of Ray's named threads by name, the
    three busiest unnamed threads on their own (the busiest is Serve's user-code event loop: ASGI, FastAPI, our
    handlers), and the rest of them together."""
    grouped: dict[str, float] = {}
    unnamed = []
    for key, value in ms_per_request.items():
        name = key.rsplit(" [", 1)[0]
        if name.startswith(("forward_", "decode_")):
            kind = f"{name.split('_')[0]} (ours)"
        elif name.startswith("ray::"):
            unnamed.append((value, name))
            continue
        else:
            kind = name
        grouped[kind] = grouped.get(kind, 0.0) + value
    unnamed.sort(reverse=True)
    for rank, (value, name) in enumerate(unnamed[:3], 1):
        grouped[f"{name}, busiest thread #{rank}"] = value
    grouped[f"{len(unnamed[3:])} other Python threads"] = sum(v for v, _ in unnamed[3:])
    return grouped


def actor_pid(class_prefix: str) -> int:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
    return next(a.pid for a in actors if a.class_name.startswith(class_prefix))


def drive(url: str, image: bytes, concurrency: int, seconds: float) -> dict:
    from genderid.loadgen import drive as run

    return run(url + "/predict", image, concurrency, seconds)


def stage_means(metrics_url: str) -> dict:
    """Mean seconds per observation of the replica's stage histograms (body, decode, forward), from Prometheus."""
    import re

    import requests

    text = requests.get(metrics_url, timeout=10).text
    out = {}
    for stage in ("body", "decode", "forward"):
        sums = [float(v) for v in re.findall(rf"^ray_genderid_{stage}_seconds_sum{{[^}}]*}} ([0-9.e+-]+)$", text, re.M)]
        counts = [float(v) for v in re.findall(rf"^ray_genderid_{stage}_seconds_count{{[^}}]*}} ([0-9.e+-]+)$", text,
                                                re.M)]
        out[stage] = (sum(sums), sum(counts))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=float, default=0.25, help="VGG16 width multiplier (cpu.yaml: 0.25)")
    parser.add_argument("--size", default="108x88", help="model input HEIGHTxWIDTH (the recorded runs: 108x88)")
    parser.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                        help="give the raw predictor and the one replica the same dedicated core (the last), and "
                             "everything else (proxy, Ray, load generator) the others")
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.split("x"))

    import ray
    import requests
    from PIL import Image

    from genderid.checkpoint import save_checkpoint
    from genderid.model import GenderNet, flops_per_image
    from genderid.predictor import Predictor
    from genderid.preprocess import Preprocessing
    from genderid.serve_deploy import deploy, load_serve_config, set_checkpoint, wait_until_running

    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    model = GenderNet(width=args.width, batch_norm=True).eval()
    checkpoint = save_checkpoint(work / "checkpoint", model, preprocessing=Preprocessing(image_size=(height, width)))
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (218, 178, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
    image = buffer.getvalue()  # a CelebA-sized JPEG

    all_cpus = os.sched_getaffinity(0)
    model_cpu, other_cpus = {max(all_cpus)}, (all_cpus - {max(all_cpus)}) or all_cpus
    if args.pin:
        pin(os.getpid(), model_cpu)
    predictor = Predictor.from_checkpoint(str(checkpoint))
    gflop = flops_per_image(predictor.model, (height, width)) / 1e9
    peak = matmul_peak_gflops(1)
    torch.set_num_threads(1)
    raw = {b: predictor_images_per_s(predictor, image, b, args.seconds / 2) for b in (1, 16)}
    decode_ms = 1000 * min(_timed(lambda: predictor.preprocess([image])) for _ in range(50))
    if args.pin:
        pin(os.getpid(), other_cpus)

    metrics_port = 8080 + os.getpid() % 1000
    # log_to_driver=False: the replica's access log would otherwise be printed here, on the same 2 cores.
    ray.init(logging_level="WARNING", log_to_driver=False, _metrics_export_port=metrics_port)
    port = 8000 + os.getpid() % 1000
    url, metrics_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"
    rows = []

    def measure(part, concurrency, cpu_of=()):
        """One load run; with ``cpu_of`` (name -> pid), each process's CPU per answered request, by thread kind."""
        before = {name: thread_cpu_seconds(pid) for name, pid in cpu_of}
        started = time.process_time()
        rows.append({"part": part, "concurrency": concurrency, **drive(url, image, concurrency, args.seconds)})
        answered = max(rows[-1]["ok"], 1)
        cpu = {"load generator": {"all threads": (time.process_time() - started)}}
        for name, pid in cpu_of:
            after = thread_cpu_seconds(pid)
            cpu[name] = {k: v - before[name].get(k, 0.0) for k, v in after.items()}
        rows[-1]["cpu_ms_per_request"] = {name: thread_kinds({k: 1000 * v / answered for k, v in threads.items()})
                                          for name, threads in cpu.items()}
        print(rows[-1], flush=True)

    # Part 2: one replica, one thread: the same CPU budget as the raw predictor.
    config = set_checkpoint(load_serve_config(port=port), str(checkpoint))
    config["applications"][0]["deployments"][0]["autoscaling_config"].update(min_replicas=1, max_replicas=1)
    deploy(config)
    wait_until_running()
    if args.pin:
        for pid in ray_pids():
            pin(pid, other_cpus)
        pin(actor_pid("ServeReplica:"), model_cpu)
    cpu_of = (("replica", actor_pid("ServeReplica:")), ("proxy", actor_pid("ProxyActor")))
    assert requests.post(url + "/predict", data=image, headers={"Content-Type": "image/jpeg"}).ok
    time.sleep(12)  # let the warm-up request reach the metrics endpoint before the baseline is read
    before = stage_means(metrics_url)
    measure("one replica", 1, cpu_of)
    time.sleep(12)
    after = stage_means(metrics_url)
    stages = {k: 1000 * (after[k][0] - before[k][0]) / max(after[k][1] - before[k][1], 1) for k in after}
    measure("one replica", 16, cpu_of)

    # Part 3: the shipped config, as it is, with no pinning.
    for pid in ray_pids():
        pin(pid, all_cpus)
    deploy(set_checkpoint(load_serve_config(port=port), str(checkpoint)))
    wait_until_running()
    for concurrency in (8, 32, 64, 512):
        measure("shipped config", concurrency)
    ray.shutdown()

    one = {r["concurrency"]: r for r in rows if r["part"] == "one replica"}
    shipped = {r["concurrency"]: r for r in rows if r["part"] == "shipped config"}
    print(f"\n### Serve throughput ({time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__})\n")
    print(f"Model: VGG16 width {args.width} with BatchNorm at {height}x{width}, {gflop:.2f} GFLOP per image; "
          f"request: a 178x218 JPEG ({len(image) / 1000:.0f} kB); load: one asyncio client process.\n")
    print("| raw predictor (1 thread) | images/s | ms per call | achieved GFLOP/s | of 1-thread matmul peak |")
    print("| --- | --- | --- | --- | --- |")
    for batch, rate in raw.items():
        print(f"| batch {batch} | {rate:.1f} | {1000 * batch / rate:.1f} | {rate * gflop:.1f} | {rate * gflop / peak:.0%} |")
    print(f"\n1-thread fp32 matmul peak: {peak:.1f} GFLOP/s; decoding the JPEG in-process: {decode_ms:.1f} ms.\n")
    print("| part | concurrency | requests/s | p50 ms | p99 ms | non-200 (status) | their p50 ms | failed |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['part']} | {r['concurrency']} | {r['rps']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
              f"{r['rejected']} {r['rejected_statuses'] or ''} | {r['rejected_p50_ms']:.0f} | {r['failed']} |")
    print("\nGoals:")
    print(f"- one replica, concurrency 16 / raw batch 16: {one[16]['rps'] / raw[16]:.2f}x (goal >= 0.85x)")
    print(f"- one replica, p50 at concurrency 1: {one[1]['p50_ms']:.1f} ms vs raw batch-1 forward "
          f"{1000 / raw[1]:.1f} ms + 10 ms = {1000 / raw[1] + 10:.1f} ms")
    print(f"- shipped config, concurrency 32 / 8: {shipped[32]['rps'] / shipped[8]['rps']:.2f}x, 64 / 8: "
          f"{shipped[64]['rps'] / shipped[8]['rps']:.2f}x (goal >= 0.9x)")
    print(f"\nStage means inside the replica at concurrency 1 (its own histograms): body read {stages['body']:.1f} ms, "
          f"decode {stages['decode']:.1f} ms, forward {stages['forward']:.1f} ms; the rest of the p50 "
          f"({one[1]['p50_ms'] - sum(stages.values()):.1f} ms) is proxy, router, batch queue and response.")
    print(f"\nCPU per answered request, by process and thread (raw predictor: {1000 / raw[1]:.1f} ms at batch 1, "
          f"{1000 / raw[16]:.1f} ms per image at batch 16; JPEG decode {decode_ms:.1f} ms):\n")
    print("| process | thread | concurrency 1, ms | concurrency 16, ms |")
    print("| --- | --- | --- | --- |")
    for name in ("replica", "proxy", "load generator"):
        kinds = sorted(set(one[1]["cpu_ms_per_request"][name]) | set(one[16]["cpu_ms_per_request"][name]),
                       key=lambda k: -one[16]["cpu_ms_per_request"][name].get(k, 0.0))
        for kind in kinds + ["(all)"]:
            values = [sum(one[c]["cpu_ms_per_request"][name].values()) if kind == "(all)"
                      else one[c]["cpu_ms_per_request"][name].get(kind, 0.0) for c in (1, 16)]
            if kind == "(all)" or max(values) >= 0.05:
                print(f"| {name} | {kind} | {values[0]:.2f} | {values[1]:.2f} |")


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
