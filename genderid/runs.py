"""The run layout: where a train run or a sweep writes what, and the one schema of ``best.json``. Pure (no Ray).

A run (``genderid train``) and a sweep (``genderid tune``) each live in ``<storage.path>/<storage.name>/``::

    best.json            the pointer to the best kept checkpoint (schema below), written last
    history.json         a train run: every epoch's metrics
    checkpoint_*/        a train run: the checkpoints Ray kept (top-k by train.checkpoint_metric, plus the latest)
    results.csv          a sweep: one row per trial
    sweep.png            a sweep: best metric against lr per unfreeze depth
    sweep_config.json    a sweep: the config it was started with (a resume must match it)
    tune/                a sweep: Ray Tune's experiment state
    trials/<trial id>/   a sweep: each trial's train run, laid out as above

Beside the runs, ``<storage.path>/feature_cache/<key>/`` holds frozen-prefix feature caches, shared by every run
and sweep under that path that needs the same features (:mod:`genderid.feature_cache`).

``best.json``, the same for a run and a sweep::

    {"kind": "train" | "sweep", "checkpoint": <location>, "metrics": <the checkpoint's epoch metrics>,
     "config": <the resolved config the checkpoint was trained with>, "params": <searched values>,
     "trial_id": <the winning trial, sweeps only>}
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

from genderid import storage
from genderid.checkpoint import CheckpointError, read_limited, read_meta

BEST_FILE = "best.json"
HISTORY_FILE = "history.json"
RESULTS_FILE = "results.csv"
SWEEP_PLOT_FILE = "sweep.png"
SWEEP_CONFIG_FILE = "sweep_config.json"
TUNE_DIR = "tune"
TRIALS_DIR = "trials"
CHECKPOINT_PREFIX = "checkpoint_"
FEATURE_CACHE_DIR = "feature_cache"
KINDS = ("train", "sweep")
MAX_BEST_BYTES = 1_000_000  # a pointer is a few kB; it is untrusted input all the same


def storage_root(path: str) -> str:
    """``storage.path`` as Ray wants it: ``s3://`` URIs as given, local paths absolute."""
    return path if storage.is_remote(path) else os.path.abspath(path)


def run_dir(storage_path: str, name: str) -> str:
    """``<storage.path>/<storage.name>``: the folder of one run or sweep."""
    return storage.join(storage_root(storage_path), name)


def run_dir_of(config) -> str:
    """The run or sweep folder of a :class:`genderid.config.Config`."""
    return run_dir(config.storage.path, config.storage.name)


def trials_dir(sweep_dir: str) -> str:
    """``<sweep>/trials``: where a sweep's trials run, each a train run named by its Tune trial id."""
    return storage.join(sweep_dir, TRIALS_DIR)


def trial_dir(sweep_dir: str, trial_id: str) -> str:
    """``<sweep>/trials/<trial id>``: one trial's train run folder."""
    return storage.join(trials_dir(sweep_dir), trial_id)


def feature_cache_root(storage_path: str) -> str:
    """``<storage.path>/feature_cache``: where the feature caches of the runs under ``storage.path`` live."""
    return storage.join(storage_root(storage_path), FEATURE_CACHE_DIR)


def path(run: str, *parts: str) -> str:
    """A file or folder inside a run folder (``path(run, BEST_FILE)``)."""
    return storage.join(run, *parts)


def kept_checkpoints(run: str) -> list[tuple[str, dict]]:
    """Every finished checkpoint that exists in a train run's folder, with its ``meta.json``.

    A directory without ``meta.json`` is a checkpoint still being written (or a broken one) and is skipped.
    """
    kept = []
    for name in storage.list_names(run):
        if not name.startswith(CHECKPOINT_PREFIX):
            continue
        candidate = storage.join(run, name)
        try:
            kept.append((candidate, read_meta(candidate)))
        except (CheckpointError, OSError, ValueError):
            continue
    return kept


def pick_best(candidates: list[tuple[str, dict]], metric: str, mode: str) -> tuple[str, dict]:
    """The best ``(location, meta)`` by ``meta["metrics"][metric]``; ties go to the later epoch, as Ray's do.

    Ray ranks the later of two equal scores higher and deletes the earlier one first, so only "ties -> latest"
    always names a checkpoint that is still there.
    """
    scored = [(loc, meta) for loc, meta in candidates if _finite(meta.get("metrics", {}).get(metric))]
    if not scored:
        raise CheckpointError(f"no kept checkpoint reports {metric!r}")
    sign = 1.0 if mode == "max" else -1.0
    return max(scored, key=lambda pair: (sign * float(pair[1]["metrics"][metric]), pair[1].get("epoch") or 0))


def best_kept_checkpoint(run: str, metric: str, mode: str, last_epoch: Optional[int] = None) -> tuple[str, dict]:
    """The best checkpoint among those that exist in ``run`` (see :func:`pick_best`).

    ``last_epoch``: ignore checkpoints of later epochs (a sweep's trial can write one after its scheduler's stop,
    which the sweep never saw: see :func:`genderid.tune_ray.summarise`).
    """
    candidates = kept_checkpoints(run)
    if last_epoch is not None:
        candidates = [(loc, meta) for loc, meta in candidates if (meta.get("epoch") or 0) <= last_epoch]
    if not candidates:
        later = "" if last_epoch is None else f" up to epoch {last_epoch}"
        raise CheckpointError(f"{run}: the run kept no checkpoint{later}")
    return pick_best(candidates, metric, mode)


def _finite(value: Any) -> bool:
    try:
        return value is not None and float(value) == float(value) and abs(float(value)) != float("inf")
    except (TypeError, ValueError):
        return False


def write_best(run: str, kind: str, checkpoint: str, params: Optional[dict] = None,
               trial_id: Optional[str] = None, file: str = BEST_FILE) -> dict:
    """Write ``<run>/best.json`` (or another pointer ``file`` of the same schema, such as the demo's
    ``latest.json``) for ``checkpoint`` after checking that it exists and is a checkpoint.

    Metrics and config come from the checkpoint's own ``meta.json``, so the pointer can never describe another
    model than the one it names.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    meta = read_meta(checkpoint)  # raises CheckpointError when it is not there
    best = {"kind": kind, "checkpoint": checkpoint, "metrics": meta.get("metrics", {}),
            "config": meta.get("config", {}), "params": dict(params or {}), "trial_id": trial_id}
    storage.write_bytes(path(run, file), json.dumps(best, indent=2, default=float).encode())
    return best


def read_best(uri: str) -> dict:
    """A ``best.json``, checked against the schema above (it is untrusted input); every reader of one uses this."""
    data = read_limited(uri, MAX_BEST_BYTES, "pointer")  # its CheckpointError (missing, too large) stands as is
    try:
        best = json.loads(data)
    except ValueError as exc:
        raise CheckpointError(f"{uri}: not valid JSON ({exc})") from None
    if not isinstance(best, dict) or not isinstance(best.get("checkpoint"), str) or not best["checkpoint"]:
        raise CheckpointError(f"{uri}: not a best.json pointer (needs a 'checkpoint' key naming a checkpoint)")
    for key in ("metrics", "config", "params"):
        if not isinstance(best.get(key, {}), dict):
            raise CheckpointError(f"{uri}: '{key}' must be an object")
    return best


# Folders inside a run that are never runs themselves (listing does not descend into them).
_RUN_INTERNALS = (TUNE_DIR, TRIALS_DIR, FEATURE_CACHE_DIR)


def _describe(folder: str, name: str, names: list[str]) -> Optional[dict]:
    """One row of :func:`list_runs` for the folder ``name``, or None when it is not a run or a sweep."""
    row = {"name": name, "location": folder, "kind": None, "when": None, "val_accuracy": None, "val_loss": None,
           "checkpoint": None, "finished": False}
    if BEST_FILE in names:  # written last: the run finished
        try:
            best = read_best(path(folder, BEST_FILE))
        except CheckpointError as exc:
            return {**row, "kind": "unknown", "error": str(exc)}
        metrics = best.get("metrics", {})
        row.update(kind=best.get("kind") if best.get("kind") in KINDS else "train", finished=True,
                   checkpoint=best["checkpoint"], val_accuracy=metrics.get("val_accuracy"),
                   val_loss=metrics.get("val_loss"), when=storage.modified(path(folder, BEST_FILE)))
        return row
    if SWEEP_CONFIG_FILE in names or TUNE_DIR in names:
        row.update(kind="sweep", when=storage.modified(path(folder, SWEEP_CONFIG_FILE)))
        return row
    if HISTORY_FILE in names or any(n.startswith(CHECKPOINT_PREFIX) for n in names):
        row.update(kind="train", when=storage.modified(path(folder, HISTORY_FILE)))
        return row
    return None


def list_runs(storage_path: str, max_depth: int = 3) -> list[dict]:
    """The train runs and sweeps under ``storage_path`` (local or ``s3://``), newest first.

    Each: ``name`` (its path under ``storage_path``), ``kind``, ``when`` (seconds since the epoch: when
    ``best.json`` was written, else the run's last progress), ``val_accuracy`` and ``val_loss`` of its best
    checkpoint, ``checkpoint``, ``finished`` (``best.json`` exists). Folders that are not runs (a demo's workdir)
    are searched down to ``max_depth`` levels; a run's own insides (trials, Tune state) are not.
    """
    root = storage_root(storage_path)
    found: list[dict] = []

    def walk(folder: str, prefix: str, depth: int) -> None:
        for name in storage.list_names(folder):
            child = storage.join(folder, name)
            if name in _RUN_INTERNALS or name.startswith(CHECKPOINT_PREFIX) or not storage.is_dir(child):
                continue
            names = storage.list_names(child)
            if not names:
                continue
            row = _describe(child, f"{prefix}{name}", names)
            if row is not None:
                found.append(row)
            elif depth < max_depth:
                walk(child, f"{prefix}{name}/", depth + 1)

    walk(root, "", 1)
    return sorted(found, key=lambda r: r["when"] or 0.0, reverse=True)
