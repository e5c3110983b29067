"""The face front end: find faces in a photo and align each onto the crop the model was trained on. No Ray.

Detection is dlib's HOG frontal face detector, landmarks are dlib's 5-point shape predictor (both eye corners and
the base of the nose) from the ``face-recognition-models`` package: both install from PyPI with their weights, and
nothing is downloaded at run time. Each face is mapped by a similarity transform (rotation, uniform scale,
translation; least squares on the two eye centres and the nose) onto :data:`CELEBA_TEMPLATE`, the mean positions
of the same three points on CelebA's aligned crops, so an aligned face looks to the model like its training data.
The aligned crop then goes through the checkpoint's ordinary :class:`genderid.preprocess.Preprocessing`.

Why dlib's HOG detector: measured on photos built from real CelebA faces (``benchmarks/faces_accuracy.py``), it
meets the recall and precision goals at a fraction of the CNN detector's CPU time, and it ships with the landmark
model in two registry packages (OpenCV's bundled Haar cascades give no landmarks).
"""
from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
from PIL import Image

from genderid.errors import UserError

# CelebA's aligned crop (img_align_celeba): its frame, and the mean positions in it of the left eye centre, the
# right eye centre (left/right as seen in the image) and the base of the nose, as dlib's 5-point model finds
# them. Measured on the real CelebA subset by benchmarks/face_template.py (in the 178x218 frame).
TEMPLATE_FRAME = (178, 218)  # width, height
CELEBA_TEMPLATE = ((68.88, 112.34), (107.03, 112.33), (87.47, 142.04))
# dlib's face box on the same crops (mean), so boxes and crops can be related (tests, the web page).
CELEBA_TEMPLATE_BOX = (41.0, 81.2, 135.1, 177.4)

DETECTORS = ("dlib-hog",)


class FaceFrontEndUnavailable(UserError, RuntimeError):
    """The detector's package (dlib-bin) or its landmark model (face-recognition-models) is not installed."""


@dataclass(frozen=True)
class FaceSettings:
    """How faces are found and aligned; stored in a checkpoint's preprocessing, so serving matches training."""

    detector: str = "dlib-hog"
    upsample: int = 1  # dlib upsampling passes: each halves the smallest face found (~80 px -> ~40 px)
    min_score: float = 0.0  # dlib's detection threshold (its SVM margin); lower finds more, and more false faces
    detect_max_side: int = 800  # photos are scaled down to this longest side to detect (landmarks use full size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values) -> "FaceSettings":
        if values is None:
            return cls()
        if not isinstance(values, dict) or set(values) - set(cls.__dataclass_fields__):
            raise ValueError(f"faces must be a mapping with keys {sorted(cls.__dataclass_fields__)}, got {values!r}")
        return cls(**values).validate()

    def validate(self) -> "FaceSettings":
        if self.detector not in DETECTORS:
            raise ValueError(f"faces.detector must be one of {DETECTORS}, got {self.detector!r}")
        if not isinstance(self.upsample, int) or isinstance(self.upsample, bool) or not 0 <= self.upsample <= 2:
            raise ValueError(f"faces.upsample must be 0, 1 or 2, got {self.upsample!r}")
        if not isinstance(self.min_score, (int, float)) or not -2.0 <= self.min_score <= 5.0:
            raise ValueError(f"faces.min_score must be a number in [-2, 5], got {self.min_score!r}")
        if not isinstance(self.detect_max_side, int) or not 64 <= self.detect_max_side <= 4096:
            raise ValueError(f"faces.detect_max_side must be a whole number in 64..4096, got {self.detect_max_side!r}")
        return self


@dataclass
class Face:
    """One face: its box and landmarks in the photo's pixels, the detector's score, and the aligned crop."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1
    score: float
    landmarks: np.ndarray  # (3, 2): left eye centre, right eye centre, nose base
    crop: Image.Image  # the face in CelebA's aligned frame, sized for the model

    @property
    def area(self) -> float:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2x3 matrix of the least-squares similarity (Umeyama, no reflection) taking ``source`` to ``target``."""
    source, target = np.asarray(source, dtype=np.float64), np.asarray(target, dtype=np.float64)
    mean_s, mean_t = source.mean(0), target.mean(0)
    s, t = source - mean_s, target - mean_t
    covariance = t.T @ s / len(source)
    u, singular, vt = np.linalg.svd(covariance)
    d = np.diag([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rotation = u @ d @ vt
    scale = float(np.trace(np.diag(singular) @ d) / s.var(0).sum())
    matrix = np.zeros((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = mean_t - scale * rotation @ mean_s
    return matrix


def apply_transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def invert_transform(matrix: np.ndarray) -> np.ndarray:
    linear = np.linalg.inv(matrix[:, :2])
    return np.hstack([linear, (-linear @ matrix[:, 2])[:, None]])


def frame_size(image_size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of CelebA's frame scaled to cover ``image_size`` (height, width), as training resizes it."""
    scale = max(image_size[0] / TEMPLATE_FRAME[1], image_size[1] / TEMPLATE_FRAME[0])
    return max(1, round(TEMPLATE_FRAME[0] * scale)), max(1, round(TEMPLATE_FRAME[1] * scale))


def align(photo: Image.Image, landmarks: np.ndarray, size: tuple[int, int] = TEMPLATE_FRAME) -> Image.Image:
    """The face with ``landmarks`` (left eye, right eye, nose; photo pixels) in CelebA's frame at ``size`` (w, h)."""
    scale_to_size = size[0] / TEMPLATE_FRAME[0]
    template = np.asarray(CELEBA_TEMPLATE) * scale_to_size
    matrix = similarity_transform(landmarks, template)
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    if scale < 0.5:
        # Shrinking a large face: reduce its neighbourhood with a box filter first, so the final bilinear warp
        # does not alias (it samples only ~1 source pixel per output pixel).
        corners = apply_transform(invert_transform(matrix), [[0, 0], [size[0], 0], [0, size[1]], [size[0], size[1]]])
        x0, y0 = np.floor(corners.min(0)).astype(int)
        x1, y1 = np.ceil(corners.max(0)).astype(int)
        x0, y0 = max(x0, 0), max(y0, 0)
        x1, y1 = min(max(x1, x0 + 1), photo.width), min(max(y1, y0 + 1), photo.height)
        if x1 > x0 and y1 > y0:
            factor = max(1, int(1.0 / (2 * scale)))
            region = photo.crop((x0, y0, x1, y1)).reduce(factor)
            landmarks = (np.asarray(landmarks, dtype=np.float64) - [x0, y0]) / factor
            photo = region
            matrix = similarity_transform(landmarks, template)
    inverse = invert_transform(matrix)
    return photo.transform(size, Image.Transform.AFFINE, data=tuple(inverse.ravel()),
                           resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))


def _model_file(name: str) -> str:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FaceFrontEndUnavailable("face detection needs the face-recognition-models package "
                                      "(pip install face-recognition-models)")
    # Found without importing the package: its __init__ needs pkg_resources, which new setuptools dropped.
    path = os.path.join(spec.submodule_search_locations[0], "models", name)
    if not os.path.isfile(path):
        raise FaceFrontEndUnavailable(f"{path} is missing; reinstall face-recognition-models")
    return path


@functools.lru_cache(maxsize=None)
def _dlib_models():
    try:
        import dlib
    except ImportError:
        raise FaceFrontEndUnavailable("face detection needs dlib (pip install dlib-bin)") from None
    return dlib, dlib.get_frontal_face_detector(), dlib.shape_predictor(
        _model_file("shape_predictor_5_face_landmarks.dat"))


class FaceFrontEnd:
    """Detect, find landmarks and align. ``faces(photo)`` returns :class:`Face` objects, largest first."""

    def __init__(self, settings: FaceSettings = FaceSettings(), crop_size: tuple[int, int] = TEMPLATE_FRAME):
        self.settings = settings.validate()
        self.crop_size = crop_size  # (width, height)
        self._dlib, self._detector, self._landmarker = _dlib_models()

    def faces(self, photo: Image.Image, max_faces: Optional[int] = None) -> list[Face]:
        """Every face found in an RGB ``photo`` (boxes in its pixels), largest first, at most ``max_faces``."""
        if photo.mode != "RGB":
            photo = photo.convert("RGB")
        scale = min(1.0, self.settings.detect_max_side / max(photo.width, photo.height))
        small = photo if scale == 1.0 else photo.resize(
            (max(1, round(photo.width * scale)), max(1, round(photo.height * scale))), Image.Resampling.BILINEAR)
        rects, scores, _ = self._detector.run(np.asarray(small), self.settings.upsample, self.settings.min_score)
        found = sorted(zip(rects, scores), key=lambda rs: rs[0].area(), reverse=True)
        if max_faces is not None:
            found = found[:max_faces]
        pixels = np.asarray(photo) if found else None
        faces = []
        for rect, score in found:
            box = tuple(float(v) / scale for v in (rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1))
            full = self._dlib.rectangle(*(int(round(v)) for v in box))
            shape = self._landmarker(pixels, full)
            points = np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], dtype=np.float64)
            eyes = sorted([points[0:2].mean(0), points[2:4].mean(0)], key=lambda p: p[0])
            landmarks = np.array([eyes[0], eyes[1], points[4]])
            box = (max(0.0, box[0]), max(0.0, box[1]),
                   min(float(photo.width), box[2]), min(float(photo.height), box[3]))
            faces.append(Face(box=box, score=float(score), landmarks=landmarks,
                              crop=align(photo, landmarks, self.crop_size)))
        return faces
