"""Does dlib's face descriptor teach the CPU recipe's model anything? A probe and a distillation (not a test).

dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``, shipped in the
face-recognition-models package, trained on millions of faces) maps an aligned face to a 128-d descriptor. Two
questions, both on a data set prepared with ``genderid prepare --split selection`` (the protocol of
``recipe_ablation.py``: choices on the ``val`` split, a seeded 10% of the train identities; the ``test`` split,
CelebA's official val identities, reported and never compared on):

1. **Probe**: how well does a linear classifier on the descriptors tell male from female? (What the teacher
   knows; it would also be a model, but one that costs dlib's ResNet at 150x150 per face.)
2. **Distillation**: train ``cpu.yaml``'s recipe with an extra loss that pulls a linear map of the student's
   pooled features towards the image's descriptor (a "hint", FitNets-style, ``1 - cosine``), optionally centred
   on the train mean, and optionally with knowledge distillation from the probe's probabilities (KL).

The descriptors are computed once (the 5-point landmarks found inside CelebA's face box, as the face front end
does) and cached in ``--cache``. The loop is recipe_ablation's: same seed, shuffling, augmentation and schedule,
so a variant differs from that script's ``base`` only in its extra loss.

    python benchmarks/distill_probe.py --data /work/data/subset-selection --cache /tmp/desc \
        [--variants hint hint-centered] [--threads 1]

Prints the probe's accuracies, then one JSON line per variant.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from genderid import engine  # noqa: E402
from genderid.config import config_location, load_config  # noqa: E402
from genderid.faces import CELEBA_TEMPLATE_BOX, TEMPLATE_FRAME, _model_file  # noqa: E402
from genderid.local_train import epoch_batches, epoch_images, read_split  # noqa: E402
from genderid.model import build_model  # noqa: E402
from genderid.preprocess import Preprocessing  # noqa: E402
from recipe_ablation import final_scores  # noqa: E402

SPLIT_NAMES = ("train", "val", "test")
# Each variant: the hint's weight, whether its targets are centred on the train mean, the KD loss's weight.
VARIANTS = {
    "hint": {"hint": 1.0, "center": False, "kd": 0.0},
    "hint-kd": {"hint": 1.0, "center": False, "kd": 1.0},
    "hint-centered": {"hint": 1.0, "center": True, "kd": 0.0},
    "hint-centered-3": {"hint": 3.0, "center": True, "kd": 0.0},
}
PROBE_L2 = (1e-4, 1e-3, 1e-2)

_dlib = {}


def _descriptor(jpeg: bytes) -> np.ndarray:
    """dlib's 128-d descriptor of one CelebA crop (landmarks found inside CelebA's face box, scaled to the image)."""
    if not _dlib:
        import dlib
        _dlib["rect"] = dlib.rectangle
        _dlib["shape"] = dlib.shape_predictor(_model_file("shape_predictor_5_face_landmarks.dat"))
        _dlib["net"] = dlib.face_recognition_model_v1(_model_file("dlib_face_recognition_resnet_model_v1.dat"))
    image = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    sx, sy = image.shape[1] / TEMPLATE_FRAME[0], image.shape[0] / TEMPLATE_FRAME[1]
    x0, y0, x1, y1 = CELEBA_TEMPLATE_BOX
    box = _dlib["rect"](round(x0 * sx), round(y0 * sy), round(x1 * sx), round(y1 * sy))
    shape = _dlib["shape"](image, box)
    return np.asarray(_dlib["net"].compute_face_descriptor(image, shape), dtype=np.float32)


def descriptors(splits: dict, cache: Path, processes: int) -> dict:
    """Each split's descriptors, computed once and kept in ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    for split in SPLIT_NAMES:
        path = cache / f"{split}.npy"
        if not path.exists():
            started = time.perf_counter()
            with multiprocessing.Pool(processes) as pool:
                values = np.stack(pool.map(_descriptor, splits[split]["image"], chunksize=64))
            np.save(path, values)
            print(f"descriptors of {split}: {len(values)} in {time.perf_counter() - started:.0f} s", flush=True)
        out[split] = np.load(path)
    return out


def fit_probe(x: np.ndarray, y: np.ndarray, l2: float) -> torch.nn.Linear:
    """Logistic regression (two logits) with an L2 penalty, fitted by L-BFGS."""
    torch.manual_seed(0)
    probe = torch.nn.Linear(x.shape[1], 2)
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(inputs), labels) + l2 * probe.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe


def accuracy(probe: torch.nn.Linear, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((probe(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def run_probe(desc: dict, splits: dict) -> tuple[torch.nn.Linear, list[dict]]:
    """Probes at each L2 strength; the one best on the selection split is the KD teacher."""
    rows = []
    for l2 in PROBE_L2:
        probe = fit_probe(desc["train"], splits["train"]["male"], l2)
        rows.append({"l2": l2, "probe": probe, **{f"{s}_accuracy": round(accuracy(probe, desc[s], splits[s]["male"]), 4)
                                                  for s in SPLIT_NAMES}})
    best = max(rows, key=lambda r: r["val_accuracy"])
    return best["probe"], [{k: v for k, v in r.items() if k != "probe"} for r in rows]


def run_variant(name: str, config_path: str, data: str, splits: dict, desc: dict, teacher) -> dict:
    spec = VARIANTS[name]
    config = load_config(config_path, [f"data.source={data}"])
    train = config.train
    torch.manual_seed(train.seed)
    preprocessing = Preprocessing.for_data(config.data)
    val = preprocessing.batch(splits["val"]["image"])
    model = build_model(config.model)
    targets = torch.from_numpy(desc["train"])
    if spec["center"]:
        targets = targets - targets.mean(0)
    targets = F.normalize(targets, dim=1)
    with torch.no_grad():
        teacher_log_p = F.log_softmax(teacher(torch.from_numpy(desc["train"])), dim=1)
    pooled = model.head[2].in_features
    projector = torch.nn.Linear(pooled, targets.shape[1])
    optimizer = engine.make_optimizer(torch.nn.ModuleList([model, projector]), train.optimizer, train.lr,
                                      train.weight_decay)
    steps = len(splits["train"]["male"]) // train.batch_size
    rows = np.arange(len(splits["train"]["male"]))
    curve, started = [], time.perf_counter()
    for epoch in range(1, train.epochs + 1):
        images = epoch_images(config, preprocessing, splits["train"]["image"], epoch)
        lr, lr_at_step = engine.epoch_lr_curve(train, epoch, steps)
        engine.set_lr(optimizer, lr)
        model.train()
        hint_sum = 0.0
        # The rows' indices ride in the attributes slot: the batches are exactly recipe_ablation's.
        batches = epoch_batches(config, images, splits["train"]["male"], epoch, attributes=rows)
        for step, batch in enumerate(batches):
            if lr_at_step is not None:
                engine.set_lr(optimizer, lr_at_step(step))
            index, labels = batch["attributes"].long(), batch["male"].long()
            features = model.head[:2](model.features(batch["image"]))
            logits = model.head[2:](features)
            hint = (1.0 - F.cosine_similarity(projector(features), targets[index], dim=1)).mean()
            loss = F.cross_entropy(logits, labels) + spec["hint"] * hint
            if spec["kd"]:
                loss = loss + spec["kd"] * F.kl_div(F.log_softmax(logits, dim=1), teacher_log_p[index],
                                                    log_target=True, reduction="batchmean")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            hint_sum += hint.item()
        metrics = engine.evaluate(model, engine.tensor_batches(val, splits["val"]["male"], 128))
        curve.append(round(metrics["accuracy"], 4))
        print(f"  {name} epoch {epoch}: hint loss {hint_sum / steps:.4f}, select acc {metrics['accuracy']:.4f}",
              flush=True)
    seconds = time.perf_counter() - started
    return {"variant": name, **spec, "epochs": train.epochs, "seconds": round(seconds, 1),
            **final_scores(model, preprocessing, splits, val), "select_curve": curve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a data set prepared with --split selection")
    parser.add_argument("--cache", required=True, type=Path, help="folder for the descriptors (made once)")
    parser.add_argument("--config", default="cpu", help="the recipe: named config or YAML (default: cpu)")
    parser.add_argument("--variants", nargs="*", default=[], choices=list(VARIANTS),
                        help="distillation runs (default: none, the probe only)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--processes", type=int, default=os.cpu_count(), help="processes computing descriptors")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    splits = {split: read_split(args.data, split) for split in SPLIT_NAMES}
    if not all(len(splits[split]["male"]) for split in SPLIT_NAMES):
        raise SystemExit(f"{args.data}: needs train, val and test rows (genderid prepare --split selection)")
    desc = descriptors(splits, args.cache, args.processes)
    teacher, probes = run_probe(desc, splits)
    for row in probes:
        print(json.dumps({"probe": row}), flush=True)
    for name in args.variants:
        print(json.dumps(run_variant(name, str(config_location(args.config)), args.data, splits, desc, teacher)),
              flush=True)


if __name__ == "__main__":
    main()
