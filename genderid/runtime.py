"""Inference runtimes for the predictor: PyTorch eager (the reference) or ONNX Runtime, in fp32 or int8. Pure.

An ONNX model is exported from a checkpoint's own model and stored next to the checkpoint, under
``<run>/exports/<weights SHA-256>/<runtime>-<precision>.onnx`` (local or ``s3://``, like the checkpoint, so every
replica on every node finds it), where its name says exactly which weights it was built from. fp32 is exported on
first use; int8 is ONNX Runtime's static quantization (QDQ, per-channel int8 weights, uint8 activations whose
ranges are calibrated on val images), built by ``genderid export`` or ``genderid evaluate --precision int8``
from a prepared data set, because a replica has no data to calibrate on.

Each runtime is a callable from a float32 NCHW batch (numpy) to float32 logits, so the predictor above it, and its
calibration and labels, stay the same for all of them.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from genderid import storage
from genderid.errors import UserError

RUNTIMES = ("torch", "onnxruntime")
PRECISIONS = ("fp32", "int8")
EXPORTS_DIR = "exports"  # beside a run's checkpoint folders
ONNX_OPSET = 18
MAX_BATCH = 4096
INPUT_NAME, OUTPUT_NAME = "image", "logits"
CALIBRATION_IMAGES = 256  # val images whose activations set int8's ranges (more changes little; measured)
MAX_ONNX_BYTES = 2_000_000_000  # an exported file is read back like a checkpoint: untrusted, size-limited

Forward = Callable[[np.ndarray], np.ndarray]


class RuntimeSettingError(UserError, ValueError):
    """A runtime or precision that does not exist, or an int8 model that was never built."""


@dataclass(frozen=True)
class RuntimeSettings:
    """Which runtime runs the model, at which precision (serve args ``runtime`` / ``precision``)."""

    runtime: str = "torch"
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise RuntimeSettingError(f"runtime: must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.precision not in PRECISIONS:
            raise RuntimeSettingError(f"precision: must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.runtime == "torch" and self.precision != "fp32":
            raise RuntimeSettingError("precision: int8 runs on runtime onnxruntime (torch serves fp32)")

    @property
    def name(self) -> str:
        return f"{self.runtime}-{self.precision}"


def export_location(checkpoint_source: str, weights_sha256: str, settings: RuntimeSettings) -> str:
    """Where the exported model of a checkpoint lives: beside the checkpoint, named by its weights' SHA-256."""
    run = checkpoint_source.rstrip("/").rsplit("/", 1)[0]  # local paths and s3:// URIs alike
    return storage.join(run, EXPORTS_DIR, weights_sha256, f"{settings.name}.onnx")


def export_fp32(model, image_size: tuple[int, int]) -> bytes:
    """The model in eval mode as an fp32 ONNX graph with a dynamic batch size (``torch.export``-based exporter;
    ONNX Runtime folds BatchNorm into the convolutions when it loads the graph)."""
    import torch

    model = model.float().eval()
    example = torch.zeros(2, 3, *image_size)  # 2, not 1: a size-1 dimension would be specialised away
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory, "model.onnx")
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},),
                                    opset_version=ONNX_OPSET, verbose=False)
        program.save(str(path))
        return path.read_bytes()


def quantize_int8(fp32_model: bytes, calibration_batches: Iterable[np.ndarray]) -> bytes:
    """Static int8 quantization of an fp32 ONNX model, activation ranges from ``calibration_batches``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, batches):
            self.batches = iter(batches)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)}

    with tempfile.TemporaryDirectory() as directory:
        fp32, prepared, int8 = (Path(directory, name) for name in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        fp32.write_bytes(fp32_model)
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        # The quantizer warns on the root logger for the head's BatchNorm1d (a rank-1 weight has no channel axis
        # to quantize per channel, so it gets one scale, as it should).
        logging.disable(logging.WARNING)
        try:
            quantize_static(str(prepared), str(int8), Reader(calibration_batches), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        finally:
            logging.disable(logging.NOTSET)
        return int8.read_bytes()


def onnx_forward(model_bytes: bytes, threads: Optional[int] = None) -> Forward:
    """An ONNX Runtime session on the CPU as a batch -> logits callable (``threads``: torch's count by default,
    so both runtimes get the same CPU budget)."""
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])

    def forward(batch: np.ndarray) -> np.ndarray:
        return session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    return forward


def torch_forward(model, device) -> Forward:
    import torch

    model = model.to(device).eval()

    @torch.inference_mode()
    def forward(batch: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(np.ascontiguousarray(batch)).to(device)).float().cpu().numpy()

    return forward


def val_batches(source: str, preprocessing, limit: int = CALIBRATION_IMAGES, batch_size: int = 32):
    """The first ``limit`` val images of a prepared data set, decoded as the model sees them: int8's calibration
    data. Read directly from the shards (no Ray: ``genderid export`` runs anywhere)."""
    from genderid import shards
    from genderid.batches import to_model_batch
    from genderid.celeba import SPLITS

    table = shards.read_table(source)
    table = table.filter(table["split"].to_numpy() == SPLITS["val"]).slice(0, limit)
    if table.num_rows == 0:
        raise RuntimeSettingError(f"precision int8: {source} has no val images to calibrate on")
    for start in range(0, table.num_rows, batch_size):
        part = table.slice(start, batch_size)
        columns = {name: part[name].to_numpy(zero_copy_only=False) for name in part.column_names}
        yield np.asarray(to_model_batch(columns, preprocessing)["image"], dtype=np.float32)


def as_module(forward: Forward):
    """A runtime's forward as a module (tensor in, tensor out), for code that runs models, e.g. the evaluation."""
    import torch

    class RuntimeModule(torch.nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(forward(images.detach().cpu().numpy()))

    return RuntimeModule()


def build(loaded, settings: RuntimeSettings, calibration_batches: Optional[Iterable[np.ndarray]] = None) -> bytes:
    """The exported model of ``loaded`` (a :class:`genderid.checkpoint.LoadedCheckpoint`) for ``settings``; stored
    beside the checkpoint, or read back from there when it already exists. int8 needs ``calibration_batches``
    the first time."""
    from genderid.checkpoint import read_limited

    location = export_location(loaded.source, loaded.meta["weights_sha256"], settings)
    if storage.exists(location):
        return read_limited(location, MAX_ONNX_BYTES, "exported model")
    fp32 = build(loaded, RuntimeSettings("onnxruntime", "fp32")) if settings.precision == "int8" else None
    if settings.precision == "fp32":
        data = export_fp32(loaded.model, tuple(loaded.preprocessing.image_size))
    elif calibration_batches is None:
        raise RuntimeSettingError(
            f"precision int8: no int8 model of {loaded.source} (weights {loaded.version}) exists yet; build it once "
            "from val images: genderid export --checkpoint CHECKPOINT --data PREPARED --precision int8")
    else:
        data = quantize_int8(fp32, calibration_batches)
    storage.write_bytes(location, data)
    return data


def flip_averaged(forward: Forward) -> Forward:
    """Horizontal-flip test-time augmentation: the mean of the logits of each image and of its mirror image.

    Faces are nearly symmetric, so the mirror image is another plausible view of the same face; it costs a second
    forward pass (measured in ``benchmarks/inference_runtime.py``), so it is off unless asked for.
    """
    def averaged(batch: np.ndarray) -> np.ndarray:
        return (forward(batch) + forward(np.ascontiguousarray(batch[..., ::-1]))) / 2.0

    return averaged


def forward_for(loaded, settings: RuntimeSettings, device=None,
                calibration_batches: Optional[Iterable[np.ndarray]] = None) -> Forward:
    """The batch -> logits callable that runs ``loaded``'s model on ``settings``' runtime (``device``: torch's;
    the CPU by default)."""
    import torch

    device = torch.device(device or "cpu")
    if settings.runtime == "torch":
        return torch_forward(loaded.model, device)
    if device.type != "cpu":
        raise RuntimeSettingError(f"runtime onnxruntime runs on the CPU here, not {device}")
    return onnx_forward(build(loaded, settings, calibration_batches))
