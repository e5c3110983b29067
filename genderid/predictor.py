"""Label and ``p_male`` for images, from a checkpoint. Pure PyTorch; Serve and the CLI wrap it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from genderid.checkpoint import LoadedCheckpoint, load_checkpoint
from genderid.preprocess import ImageInput


@dataclass(frozen=True)
class Prediction:
    label: str
    p_male: float

    def to_dict(self, model_version: Optional[str] = None) -> dict:
        out = {"label": self.label, "p_male": round(self.p_male, 6)}
        if model_version is not None:
            out["model_version"] = model_version
        return out


class Predictor:
    """A loaded model plus the preprocessing it was trained with."""

    def __init__(self, checkpoint: LoadedCheckpoint, device: str | torch.device = "cpu", batch_size: int = 16):
        self.checkpoint = checkpoint
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model = checkpoint.model.to(self.device).eval()
        self.preprocessing = checkpoint.preprocessing
        self.labels = checkpoint.labels

    @classmethod
    def from_checkpoint(cls, location: str, device: str | torch.device = "cpu", batch_size: int = 16,
                        expected_sha256: Optional[str] = None) -> "Predictor":
        """Load from a checkpoint directory, ``s3://`` URI or ``best.json`` (SHA-256 verified; optionally pinned)."""
        return cls(load_checkpoint(location, map_location=device, expected_sha256=expected_sha256), device=device,
                   batch_size=batch_size)

    @property
    def model_version(self) -> str:
        return self.checkpoint.version

    def preprocess(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Decode and normalise (raises :class:`genderid.preprocess.ImageDecodeError` on a bad image)."""
        return self.preprocessing.batch(images)

    @torch.inference_mode()
    def predict_arrays(self, arrays: np.ndarray) -> list[Prediction]:
        """Predictions for already preprocessed NCHW arrays, in chunks of ``batch_size``."""
        results: list[Prediction] = []
        for start in range(0, len(arrays), self.batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(arrays[start:start + self.batch_size])).to(self.device)
            p_male = torch.softmax(self.model(batch).float(), dim=1)[:, 1].cpu().numpy()
            results.extend(Prediction(self.labels[int(p >= 0.5)], float(p)) for p in p_male)
        return results

    def predict(self, images: Sequence[ImageInput]) -> list[Prediction]:
        """Predictions for images given as bytes or PIL images, in order."""
        return self.predict_arrays(self.preprocess(images))
