"""CPU inference runtimes against PyTorch fp32 eager, side by side in one run (not a test).

Part 1 (speed): images/s of the model's forward at batch 1 and 16 for torch fp32 eager (the predictor's runtime
        today), ONNX Runtime fp32 and ONNX Runtime int8, for the cpu.yaml model and real-width VGG16 at 224x224.
        Every runtime gets the same threads (``--threads``, default: torch's count) and the same input arrays.
Part 2 (accuracy, with --checkpoint and --data): accuracy on the val split of a prepared data set for each runtime,
        int8 calibrated on val images, and the change against torch fp32; plus how often labels agree.

    python benchmarks/inference_runtime.py [--seconds 5] [--threads 2] \
        [--checkpoint runs/cpu/best.json --data /tmp/celeba-subset-parquet]

Prints a Markdown section to paste into benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from genderid import local_train, runtime  # noqa: E402
from genderid.metrics import balanced_accuracy  # noqa: E402
from genderid.runtime import RuntimeSettings  # noqa: E402

SETTINGS = [RuntimeSettings("torch", "fp32"), RuntimeSettings("onnxruntime", "fp32"),
            RuntimeSettings("onnxruntime", "int8")]


def images_per_s(forward, batch: np.ndarray, seconds: float) -> float:
    for _ in range(3):
        forward(batch)
    started, images = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        forward(batch)
        images += len(batch)
    return images / (time.perf_counter() - started)


def checkpoint_of(model, image_size, folder: Path):
    from genderid.checkpoint import load_checkpoint, save_checkpoint
    from genderid.preprocess import Preprocessing

    save_checkpoint(str(folder), model, preprocessing=Preprocessing(image_size=image_size))
    return load_checkpoint(str(folder))


def speed_rows(name: str, loaded, seconds: float, rng) -> list[str]:
    size = tuple(loaded.preprocessing.image_size)
    calibration = [rng.standard_normal((8, 3, *size)).astype(np.float32) for _ in range(4)]
    forwards = {s.name: runtime.forward_for(loaded, s, calibration_batches=calibration) for s in SETTINGS}
    rows = []
    for batch_size in (1, 16):
        batch = rng.standard_normal((batch_size, 3, *size)).astype(np.float32)
        speeds = {key: images_per_s(forward, batch, seconds) for key, forward in forwards.items()}
        base = speeds["torch-fp32"]
        rows.append(f"| {name} | {batch_size} | {base:.1f} | {speeds['onnxruntime-fp32']:.1f} "
                    f"({speeds['onnxruntime-fp32'] / base:.2f}x) | {speeds['onnxruntime-int8']:.1f} "
                    f"({speeds['onnxruntime-int8'] / base:.2f}x) |")
    return rows


def val_split(source: str, preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """A prepared data set's val images, preprocessed once for every runtime that is scored on them, and labels."""
    val = local_train.read_split(source, "val")
    return preprocessing.batch(val["image"]), val["male"]


def predicted_labels(forward, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    return np.concatenate([forward(images[start:start + batch_size]).argmax(1)
                           for start in range(0, len(images), batch_size)])


def accuracy_rows(checkpoint: str, data: str) -> list[str]:
    from genderid.checkpoint import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    calibration = runtime.val_batches(data, loaded.preprocessing)  # what `genderid export` calibrates on
    images, truth = val_split(data, loaded.preprocessing)
    labels = {}
    for settings in SETTINGS:
        forward = runtime.forward_for(loaded, settings, calibration_batches=calibration)
        labels[settings.name] = predicted_labels(forward, images)
    base = float(np.mean(labels["torch-fp32"] == truth))
    rows = []
    for name, predicted in labels.items():
        accuracy = float(np.mean(predicted == truth))
        rows.append(f"| {name} | {accuracy:.4f} | {100 * (accuracy - base):+.2f} | "
                    f"{float(np.mean(predicted == labels['torch-fp32'])):.4f} |")
    return [f"Val split of `{data}` ({len(truth)} images), checkpoint `{checkpoint}`:", "",
            "| runtime | val accuracy | change vs torch fp32 (points) | labels equal to torch fp32 |",
            "| --- | --- | --- | --- |", *rows]


def flip_tta_rows(name: str, loaded, seconds: float, rng, checkpoint=None, data=None) -> list[str]:
    """Horizontal-flip TTA (the predictor's and Serve's ``flip_tta``) against plain torch fp32: speed, and with
    ``checkpoint`` and ``data`` the val accuracy of both."""
    size = tuple(loaded.preprocessing.image_size)
    plain = runtime.forward_for(loaded, RuntimeSettings())
    tta = runtime.flip_averaged(plain)
    rows = ["| model | batch | torch fp32 images/s (baseline) | with flip TTA | ratio |",
            "| --- | --- | --- | --- | --- |"]
    for batch_size in (1, 16):
        batch = rng.standard_normal((batch_size, 3, *size)).astype(np.float32)
        base, flipped = images_per_s(plain, batch, seconds), images_per_s(tta, batch, seconds)
        rows.append(f"| {name} | {batch_size} | {base:.1f} | {flipped:.1f} | {flipped / base:.2f}x |")
    if checkpoint and data:
        from genderid.checkpoint import load_checkpoint

        trained = load_checkpoint(checkpoint)
        forwards = {"torch fp32": runtime.forward_for(trained, RuntimeSettings())}
        forwards["torch fp32 + flip TTA"] = runtime.flip_averaged(forwards["torch fp32"])
        rows += ["", f"Val split of `{data}`, checkpoint `{checkpoint}`:", "",
                 "| predictor | val accuracy | balanced accuracy |", "| --- | --- | --- |"]
        images, true = val_split(data, trained.preprocessing)
        for label, forward in forwards.items():
            predicted = predicted_labels(forward, images)
            rows.append(f"| {label} | {np.mean(predicted == true):.4f} | {balanced_accuracy(true, predicted):.4f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=0, help="threads for every runtime (0: torch's default)")
    parser.add_argument("--checkpoint", help="a checkpoint (or best.json) for the accuracy part")
    parser.add_argument("--data", help="the prepared data set whose val split the accuracy part uses")
    parser.add_argument("--skip-vgg16", action="store_true", help="leave out real-width VGG16 at 224 (slow)")
    parser.add_argument("--flip-tta", action="store_true", help="only measure flip TTA against plain torch fp32 "
                        "(the cpu.yaml model; with --checkpoint and --data also its val accuracy)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from genderid.config import load_config, named_config_path
    from genderid.model import GenderNet

    rng = np.random.default_rng(0)
    cpu = load_config(named_config_path("cpu"))
    models = [("cpu.yaml model", GenderNet(cpu.model), tuple(cpu.data.image_size))]
    if not args.skip_vgg16:
        models.append(("real-width VGG16", GenderNet(width=1.0, batch_norm=False), (224, 224)))
    if args.flip_tta:
        with tempfile.TemporaryDirectory() as directory:
            name, model, size = models[0]
            loaded = checkpoint_of(model, size, Path(directory, "run", "checkpoint_000000"))
            rows = flip_tta_rows(f"{name}, {size[0]}x{size[1]}", loaded, args.seconds, rng, args.checkpoint, args.data)
        print(f"## Flip test-time augmentation ({time.strftime('%Y-%m-%d')}; `python benchmarks/inference_runtime.py "
              f"{' '.join(sys.argv[1:])}`; {torch.get_num_threads()} threads)\n")
        print("\n".join(rows))
        return
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for index, (name, model, size) in enumerate(models):
            loaded = checkpoint_of(model, size, Path(directory, f"run{index}", "checkpoint_000000"))
            rows += speed_rows(f"{name}, {size[0]}x{size[1]}", loaded, args.seconds, rng)
    print(f"## Inference runtimes ({time.strftime('%Y-%m-%d')}; `python benchmarks/inference_runtime.py "
          f"{' '.join(sys.argv[1:])}`; {torch.get_num_threads()} threads each)\n")
    print("| model | batch | torch fp32 eager images/s | ONNX Runtime fp32 | ONNX Runtime int8 |")
    print("| --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    if args.checkpoint and args.data:
        print()
        print("\n".join(accuracy_rows(args.checkpoint, args.data)))


if __name__ == "__main__":
    main()
