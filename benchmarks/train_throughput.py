"""Training throughput, measured against baselines in the same run (not a test).

Part 1: images/s of Ray Train with 1 and 2 workers against a plain single-process PyTorch loop over the same
        prepared data and the same model (decode included on both sides). The plain loop uses torch's default
        threads (all cores); Ray Train workers get the same cores' worth through ``scaling.torch_threads: 0``.
        Then decode + preprocess alone: Ray Data (as training reads it), and plain Ray tasks (Ray's floor under
        Ray Data), against a torch DataLoader with 2 worker processes running the same decode function.
Part 2: one SGD step's time for unfreeze depth 0..5 with real-width VGG16 at 178x218 (pure PyTorch).

    python benchmarks/train_throughput.py [--images 1200] [--size 64] [--width 0.25] [--epochs 2] [--steps 2]
    python benchmarks/train_throughput.py --data /path/to/prepared --size 80x64 --steps 0   # real photos
    python benchmarks/train_throughput.py --data /path/to/prepared --size 80x64 --decode-only

Prints a Markdown section to paste into benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
import torch


def plain_loop_images_per_s(config, source: str) -> float:
    """The baseline: one process, same decode (genderid.batches) and engine, epochs after a warm-up epoch."""
    from genderid import engine, shards
    from genderid.batches import to_model_batch
    from genderid.model import build_model
    from genderid.preprocess import Preprocessing

    preprocessing = Preprocessing.for_data(config.data)
    table = shards.read_table(source)
    table = table.filter(table["split"].to_numpy() == 0)
    columns = {n: table[n].to_numpy(zero_copy_only=False) for n in table.column_names}
    model = build_model(config.model)
    optimizer = engine.make_optimizer(model, config.train.optimizer, config.train.lr)
    size = config.train.batch_size
    rng = np.random.default_rng(0)

    def batches():
        for start in range(0, len(columns["male"]) - size + 1, size):
            chunk = {k: v[start:start + size] for k, v in columns.items()}
            batch = to_model_batch(chunk, preprocessing, rng)
            yield {"image": torch.from_numpy(batch["image"]), "male": torch.from_numpy(batch["male"])}

    engine.train_one_epoch(model, batches(), optimizer)  # warm-up
    started, images = time.perf_counter(), 0
    for _ in range(config.train.epochs):
        images += engine.train_one_epoch(model, batches(), optimizer)["images"]
    return images / (time.perf_counter() - started)


def decode_rows(source: str):
    """The train split's Parquet columns, in chunks of 32 rows: the unit of work both decoders get."""
    from genderid import shards

    table = shards.read_table(source)
    table = table.filter(table["split"].to_numpy() == 0)
    columns = {n: table[n].to_numpy(zero_copy_only=False) for n in table.column_names}
    return [{k: v[start:start + 32] for k, v in columns.items()} for start in range(0, len(columns["male"]), 32)]


class DecodeChunks(torch.utils.data.Dataset):
    """A torch Dataset whose items are the chunks above, decoded by the same function as Ray Data's."""

    def __init__(self, chunks, preprocessing):
        self.chunks, self.preprocessing = chunks, preprocessing

    def __len__(self):
        return len(self.chunks)

    def __getitem__(self, index):
        from genderid.batches import to_model_batch

        batch = to_model_batch(self.chunks[index], self.preprocessing, np.random.default_rng(index))
        return torch.from_numpy(batch["image"]), torch.from_numpy(batch["male"])


def dataloader_images_per_s(source: str, preprocessing, workers: int = 2, passes: int = 2) -> float:
    """torch DataLoader with ``workers`` processes over the train split, decode + preprocess + augment only."""
    chunks = decode_rows(source)
    loader = torch.utils.data.DataLoader(DecodeChunks(chunks, preprocessing), batch_size=None, num_workers=workers,
                                         persistent_workers=True)
    for _ in loader:  # warm-up: workers started, imports done
        pass
    started, images = time.perf_counter(), 0
    for _ in range(passes):
        for image, _ in loader:
            images += len(image)
    return images / (time.perf_counter() - started)


def ray_data_images_per_s(config, preprocessing, passes: int = 2) -> float:
    """Ray Data over the same split (genderid.ray_data.load_split, as training reads it): decode + preprocess."""
    from genderid.ray_data import load_split

    dataset = load_split(config.data.source, "train", preprocessing, augment=True, batch_size=32,
                         num_cpus=config.data.cpus_per_decode_task, tasks=config.data.decode_tasks)
    for _ in dataset.iter_batches(batch_size=32):  # warm-up
        pass
    started, images = time.perf_counter(), 0
    for _ in range(passes):
        for batch in dataset.iter_batches(batch_size=32):
            images += len(batch["male"])
    return images / (time.perf_counter() - started)


def ray_tasks_images_per_s(config, preprocessing, in_flight: int, passes: int = 2) -> float:
    """Ray's own floor under Ray Data: the DataLoader's chunks (in the object store first) decoded by the same
    function in plain Ray tasks of Ray Data's CPU per decode task, ``in_flight`` at a time, the decoded arrays
    fetched by this process (as a DataLoader's main process receives them). No Ray Data operators, budgets or
    iterators."""
    import ray

    from genderid.batches import to_model_batch

    @ray.remote(num_cpus=config.data.cpus_per_decode_task)
    def decode(chunk, seed):
        batch = to_model_batch(chunk, preprocessing, np.random.default_rng(seed))
        return batch["image"], batch["male"]

    chunks = [ray.put(chunk) for chunk in decode_rows(config.data.source)]

    def one_pass() -> int:
        images, pending = 0, []
        for seed, chunk in enumerate(chunks):
            pending.append(decode.remote(chunk, seed))
            if len(pending) >= in_flight:
                done, pending = ray.wait(pending, num_returns=1)
                images += len(ray.get(done[0])[1])
        return images + sum(len(male) for _, male in ray.get(pending))

    one_pass()  # warm-up: worker processes started, imports done
    started, images = time.perf_counter(), 0
    for _ in range(passes):
        images += one_pass()
    return images / (time.perf_counter() - started)


def ray_train_images_per_s(config, workers: int, storage: str) -> float:
    """Ray Train's own per-epoch images/s (all workers), the mean over epochs after the first."""
    import json

    from genderid.config import config_from_dict
    from genderid.train_ray import run_training

    values = config.to_dict()
    values["scaling"].update(num_workers=workers, cpus_per_worker=1.0 / workers)
    values["storage"].update(path=storage, name=f"bench-{workers}w-{int(time.time())}")
    values["train"].update(epochs=config.train.epochs + 1, early_stopping_patience=0)
    run_config = config_from_dict(values)
    run_training(run_config)
    history = json.loads(open(os.path.join(storage, run_config.storage.name, "history.json")).read())
    return float(np.mean([h["images_per_s"] for h in history[1:]]))


def depth_step_times(steps: int, batch: int) -> list[tuple[int, float, float]]:
    """(depth, seconds per step, achieved GFLOP/s) for real-width VGG16 at 178x218."""
    from genderid import engine
    from genderid.model import GenderNet, step_flops

    rows = []
    images = torch.randn(batch, 3, 218, 178)
    labels = torch.randint(0, 2, (batch,))
    for depth in range(6):
        model = GenderNet(width=1.0, unfreeze_depth=depth)
        optimizer = engine.make_optimizer(model, "adam", 1e-4)
        data = [{"image": images, "male": labels}] * (steps + 1)
        engine.train_one_epoch(model, data[:1], optimizer)  # warm-up step
        stats = engine.train_one_epoch(model, data[1:], optimizer)
        seconds = stats["seconds"] / steps
        rows.append((depth, seconds, step_flops(model, (218, 178)) * batch / seconds / 1e9))
    return rows


def image_size(text: str) -> tuple[int, int]:
    """``64`` -> (64, 64); ``80x64`` -> (80, 64): (height, width)."""
    parts = [int(part) for part in text.lower().split("x")]
    if len(parts) not in (1, 2) or min(parts) < 16:
        raise argparse.ArgumentTypeError(f"expected H or HxW (each >= 16), got {text!r}")
    return (parts[0], parts[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--size", type=image_size, default=(64, 64), help="model input: H or HxW")
    parser.add_argument("--data", help="a prepared data set (`genderid prepare`) instead of synthetic images")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs (after one warm-up epoch)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per unfreeze depth (0: skip that part)")
    parser.add_argument("--batch", type=int, default=8, help="batch of the depth sweep")
    parser.add_argument("--decode-only", action="store_true", help="only the decode table (no training)")
    args = parser.parse_args()

    from genderid.config import load_config, named_config_path
    from genderid.prepare import prepare
    from genderid.synth import write_synthetic_celeba

    work = tempfile.mkdtemp(prefix="genderid-bench-")
    height, width = args.size
    if args.data:
        source = args.data
    else:
        folder = write_synthetic_celeba(os.path.join(work, "celeba"), n=args.images, size=(width, height))
        source = os.path.join(work, "prepared")
        prepare(str(folder), source)
    config = load_config(named_config_path("tiny"), [
        f"data.source={source}", f"data.image_size=[{height}, {width}]", f"model.width={args.width}",
        f"train.epochs={args.epochs}", "train.batch_size=32"])

    from genderid.preprocess import Preprocessing
    from genderid.ray_runtime import init_ray

    if not args.decode_only:
        plain = plain_loop_images_per_s(config, source)
        ray_rows = [(w, ray_train_images_per_s(config, w, os.path.join(work, "runs"))) for w in (1, 2)]
    preprocessing = Preprocessing.for_data(config.data)
    loader = dataloader_images_per_s(source, preprocessing)
    init_ray()
    ray_data = ray_data_images_per_s(config, preprocessing)
    task_rows = [(n, ray_tasks_images_per_s(config, preprocessing, n)) for n in (1, 2, 3)]
    depth_rows = [] if args.steps == 0 or args.decode_only else depth_step_times(args.steps, args.batch)

    print(f"\n## Training throughput ({time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads)\n")
    from genderid import shards

    rows = shards.read_manifest(source)["counts"]["train"]["total"]
    print(f"{'Prepared data ' + source if args.data else 'Synthetic data'}, {rows} train images, input "
          f"{height}x{width}, VGG16 width {args.width} with BatchNorm, batch 32 per worker, {args.epochs} timed "
          "epochs after one warm-up.\n")
    if not args.decode_only:
        print("| loop | images/s | vs plain PyTorch |\n| --- | --- | --- |")
        print(f"| plain PyTorch, 1 process | {plain:.1f} | 1.00 |")
        for workers, value in ray_rows:
            threads = max(1, (os.cpu_count() or 1) // workers)  # torch_threads 0: genderid.train_ray.worker_threads
            print(f"| Ray Train, {workers} worker(s) x {1 / workers:.2g} CPU, {threads} torch thread(s) each | "
                  f"{value:.1f} | {value / plain:.2f} (epoch time {plain / value:.2f}x) |")
    print("\nDecode + preprocess + augment of the train split alone (no training), 2 CPUs, batches of 32:\n")
    print("| reader | images/s | vs DataLoader |\n| --- | --- | --- |")
    print(f"| torch DataLoader, 2 worker processes, the same decode function | {loader:.1f} | 1.00 |")
    tasks = config.data.decode_tasks or "any number of"
    print(f"| Ray Data (`genderid.ray_data.load_split`, as training reads it: at most {tasks} tasks of "
          f"{config.data.cpus_per_decode_task} CPU) | {ray_data:.1f} | {ray_data / loader:.2f} |")
    for in_flight, value in task_rows:
        print(f"| plain Ray tasks, the same chunks and function, {in_flight} in flight (no Ray Data) | {value:.1f} | "
              f"{value / loader:.2f} |")
    if not depth_rows:
        return
    print(f"\nReal-width VGG16, 178x218, batch {args.batch}, Adam, mean of {args.steps} steps after a warm-up:\n")
    print("| unfreeze depth | s/step | images/s | approx. GFLOP/s | vs depth 0 |\n| --- | --- | --- | --- | --- |")
    for depth, seconds, gflops in depth_rows:
        print(f"| {depth} | {seconds:.2f} | {args.batch / seconds:.2f} | {gflops:.0f} | "
              f"{seconds / depth_rows[0][1]:.2f}x |")


if __name__ == "__main__":
    main()
