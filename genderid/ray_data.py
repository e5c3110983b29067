"""Ray Data glue: prepared Parquet -> decoded, preprocessed splits. The decode step is :mod:`genderid.batches`."""
from __future__ import annotations

from typing import Optional

import numpy as np

from genderid import shards
from genderid.batches import corrupted_batch, to_model_batch
from genderid.celeba import ATTRIBUTES, SPLITS
from genderid.config import DataConfig
from genderid.preprocess import Preprocessing

READ_COLUMNS = ["image_id", "image", "male", "split", *ATTRIBUTES]


class Decode:
    """``map_batches`` callable: Parquet columns -> model arrays (+ ``image_id``), augmenting when asked."""

    def __init__(self, preprocessing: Preprocessing, augment: bool, keep_attributes: bool):
        self.preprocessing = preprocessing
        self.augment = augment
        self.keep_attributes = keep_attributes

    def __call__(self, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rng = np.random.default_rng() if self.augment else None
        batch = to_model_batch(columns, self.preprocessing, rng)
        if not self.keep_attributes:
            batch.pop("attributes")
        batch["image_id"] = np.asarray(columns["image_id"]).astype(str)
        return batch


def load_split(source: str, split: str, preprocessing: Preprocessing, augment: bool = False,
               keep_attributes: bool = False, num_cpus: float = DataConfig.cpus_per_decode_task,
               batch_size: Optional[int] = 64, tasks: int = 0):
    """One split of a prepared data set as a lazily decoded Ray Dataset.

    ``num_cpus``: what each read and decode task reserves; ``tasks``: the most that run at once (0: no limit),
    :attr:`genderid.config.DataConfig.decode_tasks`.
    """
    dataset = split_rows(source, split, READ_COLUMNS, num_cpus, tasks)
    return quiet(dataset.map_batches(Decode(preprocessing, augment, keep_attributes), batch_format="numpy",
                                     batch_size=batch_size, num_cpus=num_cpus, concurrency=task_limit(tasks)))


def split_rows(source: str, split: str, columns: list[str], num_cpus: float, tasks: int = 0):
    """The undecoded rows of one split of a prepared data set (``columns`` of them), as a lazy Ray Dataset."""
    from ray.data.expressions import col

    dataset = read_parquet(shards.shard_uris(source), num_cpus, tasks).select_columns(columns)
    return dataset.filter(expr=col("split") == SPLITS[split])


class CorruptedDecode:
    """``map_batches`` callable: Parquet rows -> every corruption and severity of each (:mod:`genderid.robustness`)."""

    def __init__(self, preprocessing: Preprocessing):
        self.preprocessing = preprocessing

    def __call__(self, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return corrupted_batch(columns, self.preprocessing)


def load_corrupted_split(source: str, split: str, preprocessing: Preprocessing,
                         num_cpus: float = DataConfig.cpus_per_decode_task, rows_per_batch: int = 4):
    """One split under every corruption at every severity, as one lazily decoded Ray Dataset
    (``rows_per_batch`` input rows become that many x corruptions x severities images per output batch)."""
    dataset = split_rows(source, split, ["image_id", "image", "male", "split"], num_cpus)
    return quiet(dataset.map_batches(CorruptedDecode(preprocessing), batch_format="numpy",
                                     batch_size=rows_per_batch, num_cpus=num_cpus))


def read_parquet(uris: list[str], num_cpus: float, tasks: int = 0):
    """A lazy Ray Dataset over Parquet files, read by Ray Data's file-list reader (its "V1" datasource).

    Ray 2.60's default reader ("V2") lists the files in a task of its own at the start of *every* pass, and that
    task takes a whole CPU and ~1.2 s however few files there are: an epoch of a small split paid it once for
    train and once for val, and on 2 CPUs it had to wait for a free core. The V1 reader lists (and samples) the
    files once, here, and each pass only reads (measured: ``benchmarks/train_throughput.py``, ``RESULTS.md``).
    ``num_cpus`` is what each read task reserves, so reads fit beside the Train workers; ``tasks`` the most that
    run at once (0: no limit).
    """
    import ray.data

    from genderid.console import verbose

    context = ray.data.DataContext.get_current()
    before = context.use_datasource_v2, context.enable_progress_bars
    # The reader is chosen, and its one-off sampling bar drawn, from the current context when the dataset is made.
    context.use_datasource_v2, context.enable_progress_bars = False, verbose()
    try:
        # One read task per file at most: a larger limit only makes Ray Data warn that it cannot be reached.
        return ray.data.read_parquet(uris, num_cpus=num_cpus, concurrency=task_limit(tasks, len(uris)))
    finally:
        context.use_datasource_v2, context.enable_progress_bars = before


def task_limit(tasks: int, most: Optional[int] = None) -> Optional[int]:
    """Ray Data's ``concurrency`` for a task cap (:attr:`genderid.config.DataConfig.decode_tasks`): 0 -> no limit
    (``None``), else ``tasks``, at most ``most``."""
    if not tasks:
        return None
    return tasks if most is None else min(tasks, most)


def quiet(dataset):
    """``dataset`` without Ray Data's own per-operator progress bars (kept with ``--verbose``): the step it feeds
    draws one bar of its own (see :mod:`genderid.progress`), wherever the dataset executes (a Train worker's
    split coordinator included, where the driver's settings do not reach)."""
    from genderid.console import verbose

    dataset.context.enable_progress_bars = verbose()
    return dataset


def torch_collate():
    """``iter_torch_batches`` collate: numeric columns become tensors, ``image_id`` stays a numpy array."""
    import torch
    from ray.data.collate_fn import NumpyBatchCollateFn

    class Collate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict:
            # Ray hands out read-only arrays; torch wants writable memory, so copy only where needed.
            return {k: v if k == "image_id" else torch.from_numpy(np.require(v, requirements=["C", "W"]))
                    for k, v in batch.items()}

    return Collate()
