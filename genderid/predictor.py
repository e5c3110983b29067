"""Label and ``p_male`` for images, from a checkpoint. Pure PyTorch; Serve and the CLI wrap it."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from genderid.checkpoint import LoadedCheckpoint, load_checkpoint
from genderid.faces import Face, FaceFrontEnd
from genderid.preprocess import ImageInput, open_image
from genderid.runtime import RuntimeSettings, flip_averaged, forward_for


@dataclass(frozen=True)
class Prediction:
    """One face's label, calibrated ``p_male`` and whether it falls in the checkpoint's uncertain band."""

    label: str
    p_male: float
    uncertain: bool = False

    def to_dict(self, model_version: Optional[str] = None) -> dict:
        out = {"label": self.label, "p_male": round(self.p_male, 6), "uncertain": self.uncertain}
        if model_version is not None:
            out["model_version"] = model_version
        return out


class Predictor:
    """A loaded model plus the preprocessing it was trained with."""

    def __init__(self, checkpoint: LoadedCheckpoint, device: str | torch.device = "cpu", batch_size: int = 16,
                 runtime: RuntimeSettings = RuntimeSettings(),
                 calibration_batches: Optional[Iterable[np.ndarray]] = None, flip_tta: bool = False):
        """``runtime``: torch fp32 (default) or ONNX Runtime fp32 / int8 (see :mod:`genderid.runtime`);
        ``calibration_batches``: val images for building an int8 model that does not exist yet;
        ``flip_tta``: average each image's logits with its mirror image's (two forward passes per image)."""
        self.checkpoint = checkpoint
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model = checkpoint.model.to(self.device).eval()
        self.runtime = runtime
        self.forward = forward_for(checkpoint, runtime, self.device, calibration_batches)
        self.flip_tta = flip_tta
        if flip_tta:
            self.forward = flip_averaged(self.forward)
        self.preprocessing = checkpoint.preprocessing
        self.labels = checkpoint.labels
        self.calibration = checkpoint.calibration

    @classmethod
    def from_checkpoint(cls, location: str, device: str | torch.device = "cpu", batch_size: int = 16,
                        expected_sha256: Optional[str] = None, runtime: RuntimeSettings = RuntimeSettings(),
                        calibration_batches: Optional[Iterable[np.ndarray]] = None,
                        flip_tta: bool = False) -> "Predictor":
        """Load from a checkpoint directory, ``s3://`` URI or ``best.json`` (SHA-256 verified; optionally pinned)."""
        return cls(load_checkpoint(location, map_location=device, expected_sha256=expected_sha256), device=device,
                   batch_size=batch_size, runtime=runtime, calibration_batches=calibration_batches,
                   flip_tta=flip_tta)

    @property
    def model_version(self) -> str:
        return self.checkpoint.version

    def preprocess(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Decode and normalise (raises :class:`genderid.preprocess.ImageDecodeError` on a bad image)."""
        return self.preprocessing.batch(images)

    def predict_arrays(self, arrays: np.ndarray) -> list[Prediction]:
        """Predictions for already preprocessed NCHW arrays, in chunks of ``batch_size``."""
        results: list[Prediction] = []
        for start in range(0, len(arrays), self.batch_size):
            logits = self.forward(arrays[start:start + self.batch_size])
            p_male = self.calibration.p_male(logits[:, 1] - logits[:, 0])
            uncertain = self.calibration.uncertain(p_male)
            results.extend(Prediction(self.labels[int(p >= 0.5)], float(p), bool(u)) for p, u in zip(p_male, uncertain))
        return results

    def predict(self, images: Sequence[ImageInput]) -> list[Prediction]:
        """Predictions for images given as bytes or PIL images, in order."""
        return self.predict_arrays(self.preprocess(images))

    @functools.cached_property
    def front_end(self) -> FaceFrontEnd:
        """The face detector and aligner of this checkpoint's preprocessing (loaded on first use)."""
        return self.preprocessing.face_front_end()

    def face_inputs(self, photo: Image.Image, max_faces: Optional[int] = None) -> tuple[list[Face], np.ndarray]:
        """The faces of an RGB photo, largest first, and their aligned crops as model input (NCHW)."""
        faces = self.front_end.faces(photo, max_faces)
        return faces, self.preprocessing.batch([face.crop for face in faces])

    def predict_faces(self, photo: ImageInput, max_faces: Optional[int] = None) -> dict:
        """Every face in a photo (bytes or PIL image) with its box and prediction: the ``POST /faces`` answer."""
        photo = open_image(photo)
        faces, arrays = self.face_inputs(photo, max_faces)
        predictions = [p.to_dict(self.model_version) for p in self.predict_arrays(arrays)]
        return faces_answer(faces, predictions, photo.size)


def faces_answer(faces: Sequence[Face], predictions: Sequence[dict], image_size: tuple[int, int]) -> dict:
    """``{"faces": [{"box", "detection_score", "label", "p_male", "uncertain", "model_version"}, ...],
    "image_size": [w, h]}`` from faces and their predictions (``Prediction.to_dict``), in the faces' order."""
    return {"faces": [{"box": [round(v, 1) for v in face.box], "detection_score": round(face.score, 4), **prediction}
                      for face, prediction in zip(faces, predictions)],
            "image_size": list(image_size)}
