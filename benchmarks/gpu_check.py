"""The pure-PyTorch parts on one GPU: VGG16 train step (bf16 autocast, channels_last) and the predictor.

No Ray (Ray's wheel does not travel to the GPU machines); the same engine and predictor code the Ray glue runs. It
needs the pure parts' packages only: torch, numpy, pillow, pyarrow, pyyaml (``pip install --no-deps -e .`` beside
them is enough).
Prints images/s and achieved TFLOP/s (FLOPs per image from ``genderid.model.flops_per_image``: 2 x multiply-adds
of the forward pass; a train step counts 3x the forward: forward, input gradients, weight gradients).

    python benchmarks/gpu_check.py                      # on a CUDA machine: under 5 minutes
    python benchmarks/gpu_check.py --device cpu --image-size 64 --width 0.125 --seconds 2   # a dry run here

Prints a Markdown section to paste into benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time

import numpy as np
import torch


def timed(step, seconds: float, warmup: int, sync) -> tuple[int, float]:
    """Run ``step`` ``warmup`` times, then for about ``seconds``; returns (steps, seconds) of the timed part."""
    for _ in range(warmup):
        step()
    sync()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    sync()
    return steps, time.perf_counter() - start


def train_images_per_s(model, options, batch_size: int, image_size: int, seconds: float, sync) -> float:
    from genderid import engine

    optimizer = engine.make_optimizer(model, "adamw", 1e-4)
    images = torch.randn(batch_size, 3, image_size, image_size)
    batch = {"image": images, "male": torch.randint(0, 2, (batch_size,))}

    def step():
        engine.train_one_epoch(model, [batch], optimizer, options)

    steps, elapsed = timed(step, seconds, warmup=3, sync=sync)
    return steps * batch_size / elapsed


def predictor_images_per_s(model, device, batch_size: int, image_size: int, seconds: float, sync) -> float:
    from genderid.checkpoint import save_checkpoint
    from genderid.predictor import Predictor
    from genderid.preprocess import Preprocessing

    with tempfile.TemporaryDirectory() as directory:
        save_checkpoint(directory, model.float().to("cpu"),
                        preprocessing=Preprocessing(image_size=(image_size, image_size)))
        predictor = Predictor.from_checkpoint(directory, device=device, batch_size=batch_size)
    arrays = np.random.default_rng(0).standard_normal((batch_size, 3, image_size, image_size)).astype(np.float32)
    steps, elapsed = timed(lambda: predictor.predict_arrays(arrays), seconds, warmup=3, sync=sync)
    return steps * batch_size / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--width", type=float, default=1.0, help="VGG16 channel-width multiplier (1.0 = real)")
    parser.add_argument("--train-batch", type=int, default=64)
    parser.add_argument("--predict-batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per measurement")
    args = parser.parse_args()

    from genderid import engine
    from genderid.model import GenderNet, flops_per_image

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run this on a GPU machine, or pass --device cpu for a dry run")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = GenderNet(width=args.width, batch_norm=False, unfreeze_depth=5).to(device)
    options = engine.StepOptions.for_device(device)  # bf16 autocast + channels_last on a GPU, as Ray Train runs it
    if options.channels_last:
        model = model.to(memory_format=torch.channels_last)
    flops = flops_per_image(model, (args.image_size, args.image_size))

    train = train_images_per_s(model, options, args.train_batch, args.image_size, args.seconds, sync)
    predict = predictor_images_per_s(model, device, args.predict_batch, args.image_size, args.seconds, sync)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    print(f"## GPU check ({time.strftime('%Y-%m-%d')}, {name}, torch {torch.__version__})\n")
    print(f"VGG16 width {args.width} at {args.image_size}x{args.image_size}: {flops / 1e9:.1f} GFLOP per image "
          "forward.\n")
    print("| what | batch | images/s | achieved TFLOP/s |")
    print("| --- | --- | --- | --- |")
    print(f"| train step (all blocks unfrozen, {'bf16, channels_last' if options.channels_last else 'fp32'}) | "
          f"{args.train_batch} | {train:.0f} | {train * 3 * flops / 1e12:.1f} |")
    print(f"| predictor (fp32, as served) | {args.predict_batch} | {predict:.0f} | {predict * flops / 1e12:.1f} |")


if __name__ == "__main__":
    main()
