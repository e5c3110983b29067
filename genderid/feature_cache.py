"""Frozen-prefix feature cache: a frozen prefix's outputs, computed once per image and trained on. Pure (no Ray).

With pretrained weights and no augmentation, VGG16's frozen blocks give an image the same output in every epoch
and every trial that freezes them. A cache holds, for one data set, one set of weights and one preprocessing, the
output of the first ``frozen_blocks`` conv blocks for every train and val image; a model that skips those blocks
(:meth:`genderid.model.GenderNet.set_input_blocks`) trains on it to the same weights as on the images.

A cache lives in ``<storage.path>/feature_cache/<key>/`` (see :func:`genderid.runs.feature_cache_root`)::

    _manifest.json             written last: what the key was made of, the feature shape, counts and files
    <split>/part-<hex>.parquet image_id, male, image (the features: float32, C-order bytes of ``shape``)

The key is a digest of everything the features depend on: the SHA-256 of the prefix's weights (parameters and
BatchNorm statistics), the model layout, the prefix depth, the preprocessing and the data set's manifest. A cache
with another key is never read for this model; a folder without a valid manifest is an unfinished build and is
rebuilt. The Ray Data build and loading are in :mod:`genderid.feature_cache_ray`.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import uuid
from typing import Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from genderid import shards, storage
from genderid.errors import UserError
from genderid.model import GenderNet
from genderid.preprocess import Preprocessing

FORMAT = "genderid-feature-cache"
FORMAT_VERSION = 1
MANIFEST = "_manifest.json"
SPLITS = ("train", "val")
DTYPE = np.float32
PART = re.compile(r"^(train|val)/part-[0-9a-f]{32}\.parquet$")
SCHEMA = pa.schema([("image_id", pa.string()), ("male", pa.int8()), ("image", pa.binary())])
MAX_MANIFEST_BYTES = 50_000_000  # untrusted input: a manifest lists files, it is never this large
# Rows per part file. A split needs several parts per Train worker for streaming_split to spread it, and each part
# is a read task per epoch. Ray 2.60's default Parquet reader also paid ~70 ms per file before the first batch of
# every pass (126 files 9.3-10.6 s a pass, 16 files 1.9-2.2 s on 2 cores); the reader genderid.ray_data.read_parquet
# uses lists files once (126 files 0.55-0.63 s a pass, 16 files 0.42-0.68 s). So: about PARTS_PER_WORKER parts per
# worker, of MIN..MAX_PART_ROWS rows.
MIN_PART_ROWS, MAX_PART_ROWS, PARTS_PER_WORKER = 64, 512, 8


class FeatureCacheError(UserError, ValueError):
    """A feature cache cannot be used: not applicable to the config, or its files are missing or malformed."""


def frozen_blocks_of(unfreeze_depths: Sequence[int]) -> list[int]:
    """The frozen prefixes (conv block counts > 0) that trials with these unfreeze depths need, ascending."""
    from genderid.model import NUM_BLOCKS

    return sorted({NUM_BLOCKS - d for d in unfreeze_depths if d < NUM_BLOCKS})


def rows_per_part(split_rows: int, workers: int) -> int:
    """How many rows each part file of a split holds (see :data:`MAX_PART_ROWS`)."""
    wanted = -(-max(split_rows, 1) // (PARTS_PER_WORKER * max(workers, 1)))
    return int(min(MAX_PART_ROWS, max(MIN_PART_ROWS, wanted)))


def weights_sha256(model: GenderNet, frozen_blocks: int) -> str:
    """SHA-256 of the prefix's parameters and buffers (names, dtypes, shapes and bytes), in module order."""
    digest = hashlib.sha256()
    prefix = model.features[:model.block_bounds[frozen_blocks]]
    for name, tensor in [*prefix.named_parameters(), *prefix.named_buffers()]:
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def key_fields(model: GenderNet, frozen_blocks: int, preprocessing: Preprocessing, source: str) -> dict:
    """Everything a cache's features depend on (stored in its manifest; the key is their digest)."""
    manifest = storage.read_bytes(storage.join(source, shards.MANIFEST))
    return {
        "weights_sha256": weights_sha256(model, frozen_blocks),
        "frozen_blocks": frozen_blocks,
        "layout": {"width": model.config.width, "batch_norm": model.config.batch_norm},
        "preprocessing": preprocessing.to_dict(),
        "data_manifest_sha256": hashlib.sha256(manifest).hexdigest(),
    }


def cache_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


@torch.no_grad()
def prefix_outputs(model: GenderNet, images: torch.Tensor, frozen_blocks: Sequence[int]) -> dict[int, torch.Tensor]:
    """The outputs of the first ``n`` conv blocks for each ``n`` in ``frozen_blocks``, from one pass in eval mode."""
    wanted = sorted(set(frozen_blocks))
    if not wanted or wanted[0] < 1 or wanted[-1] > model.frozen_blocks:
        raise ValueError(f"frozen_blocks must be 1-{model.frozen_blocks} (this model's frozen blocks), got {wanted}")
    outputs, x, done = {}, images, 0
    model.eval()
    for blocks in wanted:
        x = model.features[model.block_bounds[done]:model.block_bounds[blocks]](x)
        outputs[blocks], done = x, blocks
    return outputs


def part_table(image_ids: Sequence[str], male: np.ndarray, features: np.ndarray) -> pa.Table:
    """One part file's rows: the features as C-order float32 bytes, one value per image."""
    features = np.ascontiguousarray(features, dtype=DTYPE)
    return pa.table({"image_id": pa.array([str(i) for i in image_ids], pa.string()),
                     "male": pa.array(np.asarray(male, dtype=np.int8)),
                     "image": pa.array([row.tobytes() for row in features], pa.binary())}, schema=SCHEMA)


def write_part(cache_dir: str, split: str, image_ids: Sequence[str], male: np.ndarray,
               features: np.ndarray) -> dict:
    """Write one part file of ``split``; returns its manifest entry (``file``, ``rows``)."""
    name = f"{split}/part-{uuid.uuid4().hex}.parquet"
    buffer = io.BytesIO()
    pq.write_table(part_table(image_ids, male, features), buffer)
    storage.write_bytes(storage.join(cache_dir, name), buffer.getvalue())
    return {"file": name, "rows": int(len(male))}


def decode_features(column: Sequence[bytes], shape: Sequence[int]) -> np.ndarray:
    """A column of feature bytes -> float32 [N, *shape]; a row of the wrong size is a :class:`FeatureCacheError`."""
    size = int(np.prod(shape)) * np.dtype(DTYPE).itemsize
    rows = list(column)
    if any(len(row) != size for row in rows):
        raise FeatureCacheError(f"feature cache: a row is not {size} bytes (shape {list(shape)}, float32)")
    if not rows:
        return np.zeros((0, *shape), DTYPE)
    return np.frombuffer(b"".join(rows), dtype=DTYPE).reshape(len(rows), *shape).copy()


def write_manifest(cache_dir: str, fields: dict, shape: Sequence[int], parts: dict[str, list[dict]]) -> dict:
    """Commit a finished cache (written last: a folder without it is an unfinished build)."""
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "key": cache_key(fields), "fields": fields,
                "shape": [int(s) for s in shape], "dtype": np.dtype(DTYPE).name,
                "files": {split: sorted(p["file"] for p in parts.get(split, [])) for split in SPLITS},
                "rows": {split: sum(p["rows"] for p in parts.get(split, [])) for split in SPLITS}}
    storage.write_bytes(storage.join(cache_dir, MANIFEST), json.dumps(manifest, indent=2).encode())
    return manifest


def read_manifest(cache_dir: str, fields: Optional[dict] = None) -> dict:
    """A cache's manifest, validated (untrusted input); with ``fields``, it must be the cache of exactly those."""
    uri = storage.join(cache_dir, MANIFEST)
    if not storage.exists(uri):
        raise FeatureCacheError(f"{cache_dir}: no {MANIFEST}; not a feature cache, or its build did not finish")
    if storage.size(uri) > MAX_MANIFEST_BYTES:
        raise FeatureCacheError(f"{uri}: larger than {MAX_MANIFEST_BYTES} bytes; not a feature cache manifest")
    try:
        manifest = json.loads(storage.read_bytes(uri))
    except ValueError as exc:
        raise FeatureCacheError(f"{uri}: not JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
            or manifest.get("format_version") != FORMAT_VERSION:
        raise FeatureCacheError(f"{uri}: not a {FORMAT} manifest of version {FORMAT_VERSION}")
    shape, files, rows = manifest.get("shape"), manifest.get("files"), manifest.get("rows")
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise FeatureCacheError(f"{uri}: shape must be three positive integers [C, H, W], got {shape!r}")
    if manifest.get("dtype") != np.dtype(DTYPE).name:
        raise FeatureCacheError(f"{uri}: dtype must be {np.dtype(DTYPE).name}, got {manifest.get('dtype')!r}")
    if not (isinstance(files, dict) and isinstance(rows, dict)) or set(files) != set(SPLITS):
        raise FeatureCacheError(f"{uri}: files must list the splits {list(SPLITS)}")
    for split in SPLITS:
        names = files[split]
        # Names become paths under the cache folder: only our own part names, never `..` or absolute paths.
        if not isinstance(names, list) or any(not isinstance(n, str) or not PART.match(n) or
                                              not n.startswith(split + "/") for n in names):
            raise FeatureCacheError(f"{uri}: files.{split} must be a list of {split}/part-<32 hex>.parquet names")
        if not isinstance(rows.get(split), int) or rows[split] < 0:
            raise FeatureCacheError(f"{uri}: rows.{split} must be a count")
    if fields is not None and (manifest.get("key") != cache_key(fields) or manifest.get("fields") != fields):
        raise FeatureCacheError(f"{uri}: a cache of other weights, preprocessing or data (key "
                                f"{manifest.get('key')!r}, expected {cache_key(fields)!r})")
    return manifest


def part_uris(cache_dir: str, manifest: dict, split: str) -> list[str]:
    return [storage.join(cache_dir, name) for name in manifest["files"][split]]


def feature_batches(cache_dir: str, split: str, batch_size: int) -> Iterator[dict]:
    """A cached split as engine batches (``image``: the features, ``male``), in file order. For local use."""
    manifest = read_manifest(cache_dir)
    for uri in part_uris(cache_dir, manifest, split):
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
        features = decode_features(table.column("image").to_pylist(), manifest["shape"])
        male = table.column("male").to_numpy().astype(np.int64)
        for start in range(0, len(male), batch_size):
            yield {"image": torch.from_numpy(features[start:start + batch_size]),
                   "male": torch.from_numpy(male[start:start + batch_size])}
