"""Serving throughput, measured against the raw predictor in the same run (not a test).

Part 1: the pure Predictor's images/s at batch 1 and 16 (1 torch thread, like one replica with num_cpus 1), its
        achieved GFLOP/s, and this CPU's fp32 peak measured the same way (a large matmul on 1 thread).
Part 2: the Serve endpoint (serve_config.yaml, one replica, checkpoint replaced) at concurrency 1, 8 and 32,
        with batching on (max_batch_size 8) and off (1), and at concurrency 32 with a deeper replica queue
        (max_ongoing_requests 32): requests/s, p50 and p99 latency.

    python benchmarks/serve_throughput.py [--width 0.25] [--size 108x88] [--seconds 15]

The load generator runs on the same machine as the replica and competes with it for CPU, as it would on a
2-core laptop. Prints a Markdown section to paste into benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import tempfile
import threading
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


def drive(url: str, image: bytes, concurrency: int, seconds: float) -> dict:
    """``concurrency`` clients posting back to back for ``seconds``; latencies of successful requests."""
    import requests

    latencies, errors, stop = [], [], threading.Event()

    def client():
        session = requests.Session()
        while not stop.is_set():
            started = time.perf_counter()
            answer = session.post(url + "/predict", data=image, headers={"Content-Type": "image/jpeg"}, timeout=120)
            (latencies if answer.status_code == 200 else errors).append(time.perf_counter() - started)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {"rps": len(latencies) / elapsed, "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], "errors": len(errors)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=float, default=0.25, help="VGG16 width multiplier (cpu.yaml: 0.25)")
    parser.add_argument("--size", default="108x88", help="model input HEIGHTxWIDTH (cpu.yaml: 108x88)")
    parser.add_argument("--seconds", type=float, default=15.0, help="per measurement")
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

    predictor = Predictor.from_checkpoint(str(checkpoint))
    gflop = flops_per_image(predictor.model, (height, width)) / 1e9
    peak = matmul_peak_gflops(1)
    torch.set_num_threads(1)
    raw = {b: predictor_images_per_s(predictor, image, b, args.seconds / 2) for b in (1, 16)}

    # log_to_driver=False: the replica's access log would otherwise be printed here, on the same 2 cores.
    ray.init(logging_level="WARNING", log_to_driver=False)
    port = 8000 + os.getpid() % 1000
    serve_rows = []
    # (max_batch_size, max_ongoing_requests): serve_config.yaml's values, batching off, and a deep replica queue.
    for batch, ongoing, levels in ((8, 8, (1, 8, 32)), (1, 8, (1, 8, 32)), (8, 32, (32,))):
        config = set_checkpoint(load_serve_config(port=port), str(checkpoint))
        app = config["applications"][0]
        app["args"]["max_batch_size"] = batch
        app["deployments"][0]["max_ongoing_requests"] = ongoing
        app["deployments"][0]["autoscaling_config"].update(min_replicas=1, max_replicas=1)
        deploy(config)
        wait_until_running()
        url = f"http://127.0.0.1:{port}"
        assert requests.post(url + "/predict", data=image, headers={"Content-Type": "image/jpeg"}).ok
        for concurrency in levels:
            serve_rows.append({"batch": batch, "ongoing": ongoing, "concurrency": concurrency,
                               **drive(url, image, concurrency, args.seconds)})
            print(serve_rows[-1], flush=True)
    ray.shutdown()

    print(f"\n### Serve throughput ({time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__})\n")
    print(f"Model: VGG16 width {args.width} with BatchNorm at {height}x{width}, {gflop:.2f} GFLOP per image; "
          f"request: a 178x218 JPEG ({len(image) / 1000:.0f} kB). One replica, 1 torch thread (num_cpus 1).\n")
    print("| raw predictor (1 thread) | images/s | achieved GFLOP/s | of 1-thread matmul peak |")
    print("| --- | --- | --- | --- |")
    for batch, rate in raw.items():
        print(f"| batch {batch} | {rate:.1f} | {rate * gflop:.1f} | {rate * gflop / peak:.0%} |")
    print(f"\n1-thread fp32 matmul peak measured in this run: {peak:.1f} GFLOP/s.\n")
    print("| max_batch_size | max_ongoing_requests | concurrency | requests/s | p50 ms | p99 ms | errors | "
          "vs raw batch 1 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in serve_rows:
        print(f"| {row['batch']} | {row['ongoing']} | {row['concurrency']} | {row['rps']:.1f} | {row['p50_ms']:.0f} | "
              f"{row['p99_ms']:.0f} | {row['errors']} | {row['rps'] / raw[1]:.2f}x |")


if __name__ == "__main__":
    main()
