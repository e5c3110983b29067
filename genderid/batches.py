"""Parquet rows -> model batches: the one decode step of Ray Data, local loops and evaluation. Pure numpy."""
from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from genderid.celeba import ATTRIBUTES
from genderid.preprocess import Preprocessing


def to_model_batch(columns: Mapping[str, np.ndarray], preprocessing: Preprocessing,
                   rng: Optional[np.random.Generator] = None) -> dict[str, np.ndarray]:
    """Columns of prepared rows (``image`` bytes, ``male``, the 40 attributes) -> model input.

    Returns ``image`` float32 NCHW, ``male`` int64 and ``attributes`` int8 [N, 40]. Passing ``rng`` turns on
    train augmentation.
    """
    images = preprocessing.batch(list(columns["image"]), rng)
    male = np.asarray(columns["male"], dtype=np.int64)
    attributes = np.stack([np.asarray(columns[name], dtype=np.int8) for name in ATTRIBUTES], axis=1) \
        if len(male) else np.zeros((0, len(ATTRIBUTES)), np.int8)
    return {"image": images, "male": male, "attributes": attributes}


def corrupted_batch(columns: Mapping[str, np.ndarray], preprocessing: Preprocessing) -> dict[str, np.ndarray]:
    """Every row under every corruption at every severity 1..MAX (see :mod:`genderid.corruptions`), preprocessed.

    Returns ``image`` float32 NCHW, ``male`` int64, ``corruption`` (index into ``CORRUPTIONS``) and ``severity``;
    rows come out grouped by input row. The corruption applies to the full-size decoded image, as to a user's photo.
    """
    from genderid.corruptions import CORRUPTIONS, MAX_SEVERITY, corrupt
    from genderid.preprocess import open_image

    images, male, corruption, severity = [], [], [], []
    for data, label, image_id in zip(columns["image"], columns["male"], columns["image_id"]):
        photo = open_image(data)
        for index, spec in enumerate(CORRUPTIONS):
            for level in range(1, MAX_SEVERITY + 1):
                images.append(preprocessing(corrupt(photo, spec.name, level, str(image_id))))
                male.append(int(label))
                corruption.append(index)
                severity.append(level)
    height, width = preprocessing.image_size
    return {"image": np.stack(images) if images else np.zeros((0, 3, height, width), np.float32),
            "male": np.asarray(male, dtype=np.int64), "corruption": np.asarray(corruption, dtype=np.int64),
            "severity": np.asarray(severity, dtype=np.int64)}
