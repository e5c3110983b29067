"""Ray glue of the frozen-prefix feature cache: build caches with Ray Data, read cached splits as Ray Datasets.

The format, its key and the prefix's forward pass are :mod:`genderid.feature_cache`.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Sequence

import numpy as np

from genderid import feature_cache, shards, storage
from genderid.config import Config, DataConfig
from genderid.preprocess import Preprocessing

FORWARD_BATCH = 64  # images per forward pass of the prefix (a part file holds several)


def _prefix_model(config: Config):
    """The model with every block frozen: any prefix's outputs can be taken from it (the weights are the run's)."""
    from genderid.model import build_model

    return build_model(dataclasses.replace(config.model, unfreeze_depth=0)).eval()


class PrefixWriter:
    """``map_batches`` actor: decoded images -> one part file per requested prefix (one forward pass for all)."""

    def __init__(self, config: dict, caches: dict, split: str):
        import torch

        from genderid.config import config_from_dict
        from genderid.train_ray import _node_cpus, worker_threads

        parsed = config_from_dict(config)
        torch.set_num_threads(worker_threads(_node_cpus(), parsed.scaling.num_workers, parsed.scaling.use_gpu))
        self.device = torch.device("cuda" if parsed.scaling.use_gpu and torch.cuda.is_available() else "cpu")
        self.model = _prefix_model(parsed).to(self.device)
        self.caches = {int(blocks): entry for blocks, entry in caches.items()}
        for blocks, entry in self.caches.items():
            # The weights this actor loaded must be the ones the cache is keyed by (a file replaced mid-build).
            if feature_cache.weights_sha256(self.model, blocks) != entry["fields"]["weights_sha256"]:
                raise feature_cache.FeatureCacheError(
                    f"model.weights {parsed.model.weights} changed while its feature cache was being built")
        self.split = split

    def __call__(self, batch: dict) -> dict:
        import torch

        images = np.require(batch["image"], requirements=["C", "W"])
        outputs = {blocks: [] for blocks in self.caches}
        for start in range(0, len(images), FORWARD_BATCH):
            chunk = torch.from_numpy(images[start:start + FORWARD_BATCH]).to(self.device)
            for blocks, value in feature_cache.prefix_outputs(self.model, chunk, list(self.caches)).items():
                outputs[blocks].append(value.float().cpu().numpy())
        files, rows, blocks_column = [], [], []
        for blocks, entry in self.caches.items():
            part = feature_cache.write_part(entry["dir"], self.split, batch["image_id"], batch["male"],
                                            np.concatenate(outputs[blocks]))
            files.append(part["file"])
            rows.append(part["rows"])
            blocks_column.append(blocks)
        return {"frozen_blocks": np.asarray(blocks_column), "file": np.asarray(files), "rows": np.asarray(rows)}


def ensure(config: Config, cache_root: str, frozen_blocks: Sequence[int], log=print) -> dict[int, str]:
    """The cache folder of each frozen prefix in ``frozen_blocks`` for ``config``'s weights, preprocessing and data;
    the ones not yet built (or left unfinished) are built in one Ray Data pass per split."""
    wanted = sorted(set(frozen_blocks))
    if not wanted:
        return {}
    preprocessing = Preprocessing.for_data(config.data)
    model = _prefix_model(config)
    fields = {b: feature_cache.key_fields(model, b, preprocessing, config.data.source) for b in wanted}
    dirs = {b: storage.join(cache_root, feature_cache.cache_key(fields[b])) for b in wanted}
    missing = []
    for blocks in wanted:
        try:
            feature_cache.read_manifest(dirs[blocks], fields[blocks])
        except feature_cache.FeatureCacheError:
            missing.append(blocks)
    reused = [b for b in wanted if b not in missing]
    if reused:
        log(f"[cache] reusing the features of the first {_blocks(reused)} conv block(s) from {cache_root}")
    if missing:
        from genderid.train_ray import _alive_node_hosts, check_shared_storage

        check_shared_storage(cache_root, _alive_node_hosts())  # the build's actors write from every node
        started = time.perf_counter()
        rows = build(config, model, preprocessing, {b: (dirs[b], fields[b]) for b in missing})
        log(f"[cache] computed the features of the first {_blocks(missing)} conv block(s) for {rows} images in "
            f"{time.perf_counter() - started:.1f} s, under {cache_root}")
    return dirs


def _blocks(counts: Sequence[int]) -> str:
    return ", ".join(str(c) for c in counts)


def build(config: Config, model, preprocessing: Preprocessing, caches: dict[int, tuple[str, dict]]) -> int:
    """Compute and write the caches ``{frozen_blocks: (folder, key fields)}``; their manifests are written last.

    Returns the number of images. A folder left by an unfinished build is emptied first.
    """
    import torch

    from genderid.ray_data import load_split, quiet

    for directory, _ in caches.values():
        if storage.exists(directory):
            storage.delete_dir(directory)
    height, width = config.data.image_size
    with torch.no_grad():
        shapes = {b: tuple(out.shape[1:]) for b, out in
                  feature_cache.prefix_outputs(model, torch.zeros(1, 3, height, width), list(caches)).items()}
    spec = {b: {"dir": directory, "fields": fields} for b, (directory, fields) in caches.items()}
    resources = {"num_gpus": config.scaling.gpus_per_worker} if config.scaling.use_gpu else {}
    parts: dict[int, dict[str, list]] = {b: {} for b in caches}
    counts = shards.read_manifest(config.data.source)["counts"]
    for split in feature_cache.SPLITS:
        images = load_split(config.data.source, split, preprocessing, augment=False,
                            num_cpus=config.data.cpus_per_decode_task, batch_size=FORWARD_BATCH,
                            tasks=config.data.decode_tasks)
        part_rows = feature_cache.rows_per_part(counts[split]["total"], config.scaling.num_workers)
        with warnings.catch_warnings():
            # Ray 2.60 takes max_restarts only as a plain remote arg, which it marks deprecated (named ones replace
            # them from 2.64, none for restarts yet); it is what we mean on the pinned version.
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
            written = quiet(images.map_batches(
                PrefixWriter, fn_constructor_kwargs={"config": config.to_dict(), "caches": spec, "split": split},
                batch_size=part_rows, batch_format="numpy", concurrency=(1, config.scaling.num_workers),
                # No actor restarts: a failed build is simply redone, and Ray warns on every start of a
                # restartable actor whose constructor arguments sit in the object store.
                num_cpus=config.scaling.cpus_per_worker, max_restarts=0, **resources)).take_all()
        for row in written:
            parts[int(row["frozen_blocks"])].setdefault(split, []).append(
                {"file": str(row["file"]), "rows": int(row["rows"])})
    for blocks, (directory, fields) in caches.items():
        feature_cache.write_manifest(directory, fields, shapes[blocks], parts[blocks])
    return sum(p["rows"] for split_parts in next(iter(parts.values())).values() for p in split_parts)


class DecodeFeatures:
    """``map_batches`` callable: cached rows -> engine batch columns (``image``: the features)."""

    def __init__(self, shape: Sequence[int]):
        self.shape = tuple(shape)

    def __call__(self, columns: dict) -> dict:
        return {"image": feature_cache.decode_features(columns["image"], self.shape),
                "male": np.asarray(columns["male"], dtype=np.int64),
                "image_id": np.asarray(columns["image_id"]).astype(str)}


def load_cached_split(cache_dir: str, split: str, num_cpus: float = DataConfig.cpus_per_decode_task,
                      tasks: int = 0):
    """One split of a built cache as a Ray Dataset of engine batches (what ``load_split`` gives for images);
    ``num_cpus`` and ``tasks`` as in :func:`genderid.ray_data.load_split`."""
    from genderid.ray_data import quiet, read_parquet, task_limit

    manifest = feature_cache.read_manifest(cache_dir)
    uris = feature_cache.part_uris(cache_dir, manifest, split)
    if not uris:
        raise feature_cache.FeatureCacheError(f"{cache_dir}: the feature cache has no {split} rows")
    # One call per part (a block): the decode is a single frombuffer.
    return quiet(read_parquet(uris, num_cpus, tasks).map_batches(
        DecodeFeatures(manifest["shape"]), batch_format="numpy", batch_size=None, num_cpus=num_cpus,
        concurrency=task_limit(tasks)))
