"""A Tune sweep with the frozen-prefix feature cache against the same sweep without it, in one run (not a test).

Both sweeps are ``genderid tune`` of the same config, the same seeded trials (``tune.seed``) and the same data,
each in its own process with its own local Ray (start-up counted on both sides); the cached one also pays for
building its caches. The "pretrained" weights are a checkpoint of this project's own model (its ``model.pt``), so
the sweep's layout (width, BatchNorm) is the checkpoint's. ASHA's grace period is the sweep's length, so both
sweeps run every trial to the end and do the same training work.

    python benchmarks/feature_cache_sweep.py --checkpoint runs/cpu/best.json --data /tmp/celeba-subset-parquet \
        [--samples 12] [--epochs 2] [--config cpu]
    python benchmarks/feature_cache_sweep.py --floor-only --data /tmp/celeba-subset-parquet --config celeba-vgg16 \
        [--mix 5,2,5]     # the compute floor alone, for trials at depths 0, 1, 2 in these numbers; no sweep

Prints a Markdown section to paste into benchmarks/RESULTS.md, with the sweep's compute floor: the ratio the cache
would reach if a trial cost nothing but its training FLOPs (``genderid.model.step_flops``) for the trials that ran.
"""
from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from genderid import runs  # noqa: E402
from genderid.checkpoint import WEIGHTS_FILE, resolve_location  # noqa: E402
from genderid.config import config_location, load_config  # noqa: E402
from genderid.model import NUM_BLOCKS, GenderNet, step_flops  # noqa: E402
from genderid.shards import read_manifest  # noqa: E402


def sweep(storage: Path, overrides: list[str], config: str) -> tuple[float, list[dict]]:
    """Wall seconds of one ``genderid tune`` process, and its results rows."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "genderid", "tune", "--config", config,
                           f"storage.path={storage}", "storage.name=sweep", *overrides],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"genderid tune failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    with open(runs.path(str(storage / "sweep"), runs.RESULTS_FILE)) as handle:
        return seconds, list(csv.DictReader(handle))


def epoch_flops(model: GenderNet, image_size: tuple[int, int], counts: dict) -> float:
    """Training FLOPs of one epoch: a train step per train image and a forward per val image."""
    return (counts["train"]["total"] * step_flops(model, image_size)
            + counts["val"]["total"] * step_flops(model, image_size, backward=False))


def compute_floor(config, depths: list[int], counts: dict) -> float:
    """The cached sweep's FLOPs over the plain sweep's, for trials of these unfreeze depths: the ratio left if
    process starts, data reading and checkpoints cost nothing and a FLOP took the same time in every layer."""
    cached = plain = 0.0
    for depth in set(depths):  # one model per depth: a real-width VGG16 takes a while to build
        model = GenderNet(config.model, unfreeze_depth=depth)
        plain += depths.count(depth) * epoch_flops(model, config.data.image_size, counts)
        model.set_input_blocks(NUM_BLOCKS - depth)
        cached += depths.count(depth) * epoch_flops(model, config.data.image_size, counts)
    return cached / plain


def print_floor(config, counts: dict, mix: list[int]) -> None:
    """The compute floor per unfreeze depth, and for a sweep of ``mix[d]`` trials at depth ``d``."""
    height, width = config.data.image_size
    print(f"Compute floor, model width {config.model.width} ({'vgg16_bn' if config.model.batch_norm else 'vgg16'}) "
          f"at {height}x{width}, {counts['train']['total']} train and {counts['val']['total']} val images an epoch:\n")
    print("| trials | cached / plain training FLOPs |\n| --- | --- |")
    for depth in range(len(mix)):
        print(f"| one at depth {depth} | {compute_floor(config, [depth], counts):.3f} |")
    depths = [depth for depth, trials in enumerate(mix) for _ in range(trials)]
    print(f"| {' + '.join(f'{n} at depth {d}' for d, n in enumerate(mix))} | "
          f"**{compute_floor(config, depths, counts):.3f}** |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="checkpoint or best.json whose weights stand in for pretrained ones")
    parser.add_argument("--data", required=True, help="prepared data set (genderid prepare)")
    parser.add_argument("--config", default="cpu", help="named config or YAML of the sweep (default: cpu)")
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--floor-only", action="store_true", help="print the compute floor alone; run no sweep")
    parser.add_argument("--mix", default="4,4,4", help="with --floor-only: trials at unfreeze depth 0,1,2")
    args = parser.parse_args()
    if args.floor_only:
        print_floor(load_config(config_location(args.config)), read_manifest(args.data)["counts"],
                    [int(n) for n in args.mix.split(",")])
        return
    if not args.checkpoint:
        parser.error("--checkpoint is needed to run the sweeps")

    weights = runs.path(resolve_location(args.checkpoint), WEIGHTS_FILE)
    overrides = [f"data.source={args.data}", f"model.weights={weights}", "data.augment=false",
                 "tune.unfreeze_depth=[0, 1, 2]", "tune.lr=[0.0001, 0.01]", f"tune.num_samples={args.samples}",
                 f"tune.max_epochs={args.epochs}", f"tune.grace_period={args.epochs}", "tune.seed=0",
                 # 0.9 CPU: a trial's worker and driver (1.01 CPUs with cpu.yaml's 1) leave Ray Data its whole CPU
                 # on 2 cores, or the split's Parquet sampling task never starts (see tune_ray.default_concurrency).
                 "scaling.cpus_per_worker=0.9", "train.early_stopping_patience=0"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for side, extra in (("with the cache", ["tune.feature_cache=true"]), ("without (baseline)", [])):
            print(f"running the sweep {side} ...", file=sys.stderr, flush=True)
            results[side] = sweep(Path(tmp) / side.split()[0], [*overrides, *extra], args.config)
    base_seconds, base_rows = results["without (baseline)"]
    print(f"## Feature cache: a {args.samples}-trial sweep ({time.strftime('%Y-%m-%d')})\n")
    print(f"Command: `python benchmarks/feature_cache_sweep.py --checkpoint {args.checkpoint} --data {args.data} "
          f"--samples {args.samples} --epochs {args.epochs} --config {args.config}`\n")
    print("| sweep | wall s | vs without | best val accuracy | trials |")
    print("| --- | --- | --- | --- | --- |")
    for side, (seconds, rows) in results.items():
        best = max(float(r["best_val_accuracy"]) for r in rows if r.get("best_val_accuracy"))
        print(f"| {side} | {seconds:.1f} | {seconds / base_seconds:.2f} | {best:.4f} | {len(rows)} |")
    config = load_config(config_location(args.config), overrides)
    depths = [int(r["config/unfreeze_depth"]) for r in base_rows]
    mix = ", ".join(f"{depths.count(d)} at depth {d}" for d in sorted(set(depths)))
    floor = compute_floor(config, depths, read_manifest(args.data)["counts"])
    print(f"\nCompute floor for these trials ({mix}): **{floor:.2f}** (the cached sweep's training FLOPs over the "
          "baseline's: its ratio if nothing but FLOPs took time)")
    print("\nPer trial (same seeded parameters on both sides):\n")
    print("| lr | unfreeze depth | val accuracy with | without |")
    print("| --- | --- | --- | --- |")
    cached = {(r["config/lr"], r["config/unfreeze_depth"]): r for r in results["with the cache"][1]}
    for row in sorted(base_rows, key=lambda r: (int(r["config/unfreeze_depth"]), float(r["config/lr"]))):
        other = cached.get((row["config/lr"], row["config/unfreeze_depth"]), {})
        print(f"| {float(row['config/lr']):.2e} | {row['config/unfreeze_depth']} | "
              f"{float(other.get('best_val_accuracy', 'nan')):.4f} | {float(row['best_val_accuracy']):.4f} |")


if __name__ == "__main__":
    main()
