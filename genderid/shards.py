"""The prepared data set: Parquet shards plus a ``_manifest.json`` that commits them. Pure pyarrow.

Layout of a prepared location (local path or ``s3://`` prefix)::

    _manifest.json                  counts per split and class, source, split recipe, skipped images, files
    v<timestamp>-<id>/part-00000.parquet ...

A prepare writes its shards into a fresh version folder and then replaces ``_manifest.json`` in one atomic write
(rename locally, a single PUT on S3). Readers take the file list from the manifest, never from a listing, so an
interrupted prepare leaves the previous data set (or nothing that looks like one) intact; the next successful
prepare deletes folders no manifest names.
"""
from __future__ import annotations

import io
import json
import re
import time
import uuid
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from genderid import storage
from genderid.errors import UserError
from genderid.celeba import ATTRIBUTES, SPLITS, CelebaIndex
from genderid.faces import TEMPLATE_FRAME
from genderid.preprocess import ImageDecodeError, ImageTooLargeError, open_image

MANIFEST = "_manifest.json"
FORMAT = "genderid-parquet"
FORMAT_VERSION = 1
VERSION_DIR = re.compile(r"^v\d{8}T\d{6}-[0-9a-f]{8}$")
SPLIT_NAMES = {v: k for k, v in SPLITS.items()}

SCHEMA = pa.schema(
    [pa.field("image_id", pa.string(), nullable=False), pa.field("image", pa.binary(), nullable=False),
     pa.field("male", pa.int8(), nullable=False), pa.field("split", pa.int8(), nullable=False),
     pa.field("identity", pa.int32(), nullable=True)]
    + [pa.field(name, pa.int8(), nullable=False) for name in ATTRIBUTES]
)


class DatasetError(UserError, ValueError):
    """A prepared location is missing, unfinished or not a genderid data set."""


def shard_table(image_ids: Sequence[str], images: Sequence[bytes], split: np.ndarray, attributes: np.ndarray,
                identity: Optional[np.ndarray] = None) -> pa.Table:
    """Rows in the contract's schema; ``male`` is the ``Male`` attribute column."""
    attributes = np.asarray(attributes, dtype=np.int8).reshape(len(image_ids), len(ATTRIBUTES))
    columns = {
        "image_id": pa.array(list(image_ids), pa.string()),
        "image": pa.array(list(images), pa.binary()),
        "male": pa.array(attributes[:, ATTRIBUTES.index("Male")], pa.int8()),
        "split": pa.array(np.asarray(split, dtype=np.int8), pa.int8()),
        "identity": pa.nulls(len(image_ids), pa.int32()) if identity is None
        else pa.array(np.asarray(identity, dtype=np.int32), pa.int32()),
    }
    for column, name in enumerate(ATTRIBUTES):
        columns[name] = pa.array(attributes[:, column], pa.int8())
    return pa.table(columns, schema=SCHEMA)


def plan_shards(index: CelebaIndex, split: np.ndarray, rows_per_shard: int) -> list[dict]:
    """Cut the rows that have a split (>= 0) into shard specs of at most ``rows_per_shard`` rows."""
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    rows = np.flatnonzero(np.asarray(split) >= 0)
    specs = []
    for number, start in enumerate(range(0, len(rows), rows_per_shard)):
        chunk = rows[start:start + rows_per_shard]
        specs.append({
            "shard": number,
            "image_ids": [index.image_ids[i] for i in chunk],
            "split": split[chunk].tolist(),
            "attributes": index.attributes[chunk].tolist(),
            "identity": None if index.identity is None else index.identity[chunk].tolist(),
        })
    return specs


# The largest source image prepare decodes; CelebA's are 178x218, and a larger "image" is most likely a
# decompression bomb (a few kB of PNG that would decode to gigabytes). Such images are skipped and counted.
MAX_SOURCE_PIXELS = 40_000_000


def aligned_jpeg(front_end, data: bytes, image) -> Optional[bytes]:
    """The largest face of ``image`` aligned to CelebA's frame, as JPEG bytes; None when no face is found."""
    faces = front_end.faces(image, max_faces=1)
    if not faces:
        return None
    buffer = io.BytesIO()
    faces[0].crop.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_shard(spec: dict, source: str, destination: str, align: Optional[dict] = None) -> dict:
    """Read and check one shard's JPEGs, write ``destination/part-NNNNN.parquet``; return its summary.

    Images that cannot be decoded (corrupt, truncated, decompression bombs) are skipped and listed, never
    written. Images that cannot be *read* (missing, permissions, a network error that persisted through the S3
    client's retries) are listed as ``failed``: they say nothing about the data, and the prepare must fail rather
    than silently unbalance the data set. With ``align`` (face settings), each image is replaced by its largest
    face aligned to CelebA's frame; images where no face is found are listed as ``no_face`` and left out.
    """
    ids, images, keep, skipped, failed, no_face = list(spec["image_ids"]), [], [], [], [], []
    front_end = None
    if align is not None:
        from genderid.faces import FaceFrontEnd, FaceSettings

        front_end = FaceFrontEnd(FaceSettings.from_dict(align))
    for row, image_id in enumerate(ids):
        uri = storage.join(source, "img_align_celeba", image_id)
        try:
            data = storage.read_bytes(uri)
        except OSError as exc:
            failed.append({"image_id": image_id, "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        try:
            image = open_image(data, max_pixels=MAX_SOURCE_PIXELS)  # full decode: catches truncated and corrupt
        except (ImageDecodeError, ImageTooLargeError) as exc:
            skipped.append({"image_id": image_id, "error": str(exc)[:200]})
            continue
        if front_end is not None:
            data = aligned_jpeg(front_end, data, image)
            if data is None:
                no_face.append(image_id)
                continue
        images.append(data)
        keep.append(row)
    split = np.asarray(spec["split"], dtype=np.int8)[keep]
    attributes = np.asarray(spec["attributes"], dtype=np.int8).reshape(len(ids), len(ATTRIBUTES))[keep]
    identity = None if spec.get("identity") is None else np.asarray(spec["identity"], dtype=np.int32)[keep]
    table = shard_table([ids[i] for i in keep], images, split, attributes, identity)
    name = f"part-{int(spec['shard']):05d}.parquet"
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="none")  # JPEG bytes do not compress further
    storage.write_bytes(storage.join(destination, name), buffer.getvalue())
    return {"file": name, "rows": table.num_rows, "counts": split_counts(split, attributes[:, ATTRIBUTES.index("Male")]),
            "skipped": skipped, "failed": failed, "no_face": no_face}


def split_counts(split: np.ndarray, male: np.ndarray) -> dict:
    """``{split name: {"male", "female", "total"}}``."""
    counts = {}
    for name, code in SPLITS.items():
        in_split = np.asarray(split) == code
        n_male = int(np.sum(np.asarray(male)[in_split] == 1))
        counts[name] = {"male": n_male, "female": int(in_split.sum()) - n_male, "total": int(in_split.sum())}
    return counts


def _merge_counts(parts: Iterable[dict]) -> dict:
    total = {name: {"male": 0, "female": 0, "total": 0} for name in SPLITS}
    for part in parts:
        for name, entry in part.items():
            for key, value in entry.items():
                total[name][key] += value
    return total


def new_version() -> str:
    return time.strftime("v%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def check_destination(destination: str) -> None:
    """Refuse to write into a non-empty folder that is not a genderid data set (it could be anything)."""
    names = storage.list_names(destination)
    foreign = [n for n in names if n != MANIFEST and not VERSION_DIR.match(n) and not n.startswith(MANIFEST)]
    if foreign:
        raise DatasetError(f"{destination}: not empty and not a genderid data set (found {foreign[0]!r}); "
                           "choose an empty or new --out")


TaskRunner = Callable[[Callable[[dict], dict], list], list]


def prepare_dataset(index: CelebaIndex, split: np.ndarray, destination: str, recipe: dict,
                    run_tasks: TaskRunner, rows_per_shard: int = 2000, align: Optional[dict] = None) -> dict:
    """Write all shards with ``run_tasks(fn, specs)`` (Ray Data in production), then publish the manifest.

    ``align`` (face settings, :class:`genderid.faces.FaceSettings` as a dict) runs the face front end on every
    image: for data sets whose crops are not CelebA's aligned ones (tight crops, photos)."""
    check_destination(destination)
    version = new_version()
    specs = plan_shards(index, split, rows_per_shard)
    target = storage.join(destination, version)
    results = sorted(run_tasks(lambda spec: write_shard(spec, index.root, target, align), specs),
                     key=lambda r: r["file"])
    failed = [f for r in results for f in r.get("failed", [])]
    if failed:  # nothing is published: the previous data set (if any) stays the current one
        storage.delete_dir(target)
        first = failed[0]
        raise DatasetError(f"{index.root}: {len(failed)} image(s) could not be read (after the storage client's "
                           f"retries), e.g. {first['image_id']}: {first['error']}; nothing was published")
    skipped = [s for r in results for s in r["skipped"]]
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": index.root, "split": recipe,
        "files": [f"{version}/{r['file']}" for r in results],
        "rows": sum(r["rows"] for r in results),
        "counts": _merge_counts(r["counts"] for r in results),
        "skipped": {"count": len(skipped), "images": skipped},
    }
    if align is not None:
        no_face = [i for r in results for i in r.get("no_face", [])]
        manifest["aligned"] = {"faces": align, "frame": list(TEMPLATE_FRAME),
                               "no_face": {"count": len(no_face), "images": no_face}}
    publish(destination, manifest)
    return manifest


def publish(destination: str, manifest: dict) -> None:
    """Commit ``manifest`` atomically, then delete version folders it does not name."""
    storage.write_bytes(storage.join(destination, MANIFEST), json.dumps(manifest, indent=2).encode())
    current = {f.split("/", 1)[0] for f in manifest["files"]}
    for name in storage.list_names(destination):
        if VERSION_DIR.match(name) and name not in current:
            storage.delete_dir(storage.join(destination, name))


def read_manifest(source: str) -> dict:
    """The manifest of a prepared data set; a clear error where there is none (e.g. an interrupted prepare)."""
    uri = storage.join(source, MANIFEST)
    if not storage.exists(uri):
        raise DatasetError(f"{source}: no {MANIFEST}; not a prepared data set (run `genderid prepare`), "
                           "or its prepare did not finish")
    manifest = json.loads(storage.read_bytes(uri))
    if manifest.get("format") != FORMAT:
        raise DatasetError(f"{uri}: not a {FORMAT} manifest")
    return manifest


def shard_uris(source: str) -> list[str]:
    """Every shard of a prepared data set, as listed by its manifest."""
    return [storage.join(source, name) for name in read_manifest(source)["files"]]


def read_table(source: str, columns: Optional[list[str]] = None) -> pa.Table:
    """The whole data set as one Arrow table (small data, tests and local tools)."""
    tables = []
    for uri in shard_uris(source):
        tables.append(pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=columns))
    if not tables:
        return SCHEMA.empty_table() if columns is None else SCHEMA.empty_table().select(columns)
    return pa.concat_tables(tables)
