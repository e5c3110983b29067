"""`genderid prepare`: a CelebA folder -> Parquet shards, with the shard writes run in parallel on Ray Data."""
from __future__ import annotations

import json
from typing import Callable

from genderid import celeba, progress, shards
from genderid.faces import FaceSettings


def run_on_ray_data(fn: Callable[[dict], dict], specs: list[dict], num_cpus: float = 0.5) -> list[dict]:
    """Run ``fn`` over ``specs`` as Ray Data tasks, one block (one task) per spec."""
    import ray

    if not specs:
        return []
    # JSON strings keep Arrow from guessing types of nested lists (and of empty ones).
    items = [{"spec": json.dumps(spec)} for spec in specs]
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    from genderid.ray_data import quiet

    results = quiet(dataset.map(lambda row: {"result": json.dumps(fn(json.loads(row["spec"])))}, num_cpus=num_cpus))
    return [json.loads(row["result"])
            for row in progress.track(results.iter_rows(), len(specs), "prepare", "shards")]


SELECT_FRACTION = 0.1  # the selection recipe's share of train identities held out for model selection


def split_for(index: celeba.CelebaIndex, recipe: str, per_class: int, test_per_class: int, seed: int):
    """The split column and the manifest's description of how it was made."""
    if recipe == "official":
        return celeba.official_split(index), {"recipe": "official", "file": celeba.PARTITION_FILE}
    if recipe == "balanced":
        split = celeba.balanced_split(index, per_class, test_per_class, val_fraction=0.2, seed=seed)
        return split, {"recipe": "balanced", "per_class": per_class, "test_per_class": test_per_class,
                       "val_fraction": 0.2, "seed": seed}
    if recipe == "selection":
        return celeba.selection_split(index, select_fraction=SELECT_FRACTION, seed=seed), {
            "recipe": "selection", "select_fraction": SELECT_FRACTION, "seed": seed,
            "val": "a seeded share of the official train identities: model selection",
            "test": "the official val and test images: reported, never chosen on"}
    raise celeba.SplitError(f"split recipe must be one of {celeba.SPLIT_RECIPES}, got {recipe!r}")


def prepare(source: str, destination: str, recipe: str = "official", per_class: int = 20000,
            test_per_class: int = 500, seed: int = 0, rows_per_shard: int = 2000, num_cpus: float = 0.5,
            align: bool = False) -> dict:
    """Read and check the CelebA folder, write and publish the shards; returns the manifest.

    ``align``: run the face front end (default :class:`genderid.faces.FaceSettings`) on every image and store its
    largest face aligned to CelebA's frame, for data whose crops are not CelebA's aligned ones."""
    from genderid.ray_runtime import init_ray

    index = celeba.read_celeba(source)
    split, description = split_for(index, recipe, per_class, test_per_class, seed)
    init_ray()
    return shards.prepare_dataset(index, split, destination, description,
                                  run_tasks=lambda fn, specs: run_on_ray_data(fn, specs, num_cpus),
                                  rows_per_shard=rows_per_shard,
                                  align=FaceSettings().to_dict() if align else None)
