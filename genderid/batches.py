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
