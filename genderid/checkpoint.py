"""Self-describing checkpoint directories. Pure PyTorch (+ pyarrow for ``s3://``).

A checkpoint directory holds::

    model.pt         the model's state dict (loaded with weights_only=True)
    meta.json        format version, SHA-256 of model.pt (and train_state.pt), the model's description (the
                     ``model`` config section it was built from and is rebuilt from),
                     the resolved config, the preprocessing it expects, label names, metrics and epoch
    train_state.pt   optional: optimizer state and loop state, for resuming a run

Everything needed to rebuild and feed the model is in the directory. A ``best.json`` pointer
(``{"checkpoint": <location>, ...}``) may be given wherever a checkpoint location is expected.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from genderid import storage
from genderid.calibration import Calibration
from genderid.config import ConfigError, ModelConfig, model_config_from_dict
from genderid.errors import UserError
from genderid.model import LABELS, GenderNet
from genderid.preprocess import Preprocessing

FORMAT = "genderid-checkpoint"
FORMAT_VERSION = 2  # 2: the model is described by its `model` config section (1: `architecture`)
WEIGHTS_FILE = "model.pt"
META_FILE = "meta.json"
TRAIN_STATE_FILE = "train_state.pt"


class CheckpointError(UserError, ValueError):
    """A checkpoint is missing, malformed or fails its SHA-256 check."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _serialise(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def model_description(model: GenderNet) -> dict:
    """The ``model`` config section that rebuilds ``model`` (``GenderNet(ModelConfig(**description))``)."""
    return dataclasses.asdict(model.config)


def model_config_of(meta: dict, where: str) -> ModelConfig:
    """The validated :class:`ModelConfig` a ``meta.json`` describes (untrusted: unknown keys are refused)."""
    description = meta.get("model") if meta.get("format_version") == FORMAT_VERSION else meta.get("architecture")
    try:
        return model_config_from_dict(description)
    except ConfigError as exc:
        raise CheckpointError(f"{where}: invalid model description: {exc}") from None


def save_checkpoint(directory: str | Path, model: torch.nn.Module, *, preprocessing: Preprocessing,
                    config: Optional[dict] = None, metrics: Optional[dict] = None, epoch: Optional[int] = None,
                    train_state: Optional[dict] = None, history: Optional[list] = None,
                    calibration: Optional[Calibration] = None) -> Path:
    """Write a checkpoint into a local ``directory`` (created if needed); returns it.

    ``model`` may be wrapped (DDP): its ``module`` is saved. ``meta.json`` is written last, so a directory
    without it is an unfinished checkpoint.
    """
    model = getattr(model, "module", model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = _serialise({k: v.detach().cpu() for k, v in model.state_dict().items()})
    (directory / WEIGHTS_FILE).write_bytes(weights)
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "weights_file": WEIGHTS_FILE, "weights_sha256": _sha256(weights),
        "model": model_description(model), "preprocessing": preprocessing.to_dict(),
        "labels": list(LABELS), "config": config or {}, "metrics": metrics or {}, "epoch": epoch,
        "history": history or [], "calibration": (calibration or Calibration.identity()).to_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if train_state is not None:
        state = _serialise(train_state)
        (directory / TRAIN_STATE_FILE).write_bytes(state)
        meta["train_state_sha256"] = _sha256(state)
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=float))
    return directory


@dataclass
class LoadedCheckpoint:
    """A rebuilt model and what its checkpoint says about it."""

    model: GenderNet
    meta: dict
    preprocessing: Preprocessing
    source: str
    train_state: Optional[dict] = None

    @property
    def version(self) -> str:
        """Short, content-derived model version (the weights' SHA-256 prefix)."""
        return self.meta["weights_sha256"][:12]

    @property
    def calibration(self) -> Calibration:
        """Temperature and uncertain band (identity for checkpoints written before calibration existed)."""
        return Calibration.from_dict(self.meta.get("calibration"))

    @property
    def labels(self) -> list[str]:
        return list(self.meta["labels"])


# Size limits on what a checkpoint location may make us read (untrusted input: a listing or a pointer may be
# wrong or hostile). Real VGG16 weights are ~60 MB; its training state with Adam is ~116 MB more.
MAX_META_BYTES = 4_000_000
MAX_WEIGHTS_BYTES = 2_000_000_000
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def resolve_location(location: str) -> str:
    """A checkpoint location, following a ``best.json`` pointer if one is given."""
    location = str(location)
    if location.endswith(".json"):
        from genderid.runs import read_best  # the pointer's owner (it imports this module, hence here)

        return read_best(location)["checkpoint"]
    return location


def read_limited(uri: str, limit: int, what: str) -> bytes:
    """The whole file at ``uri``, refusing one larger than ``limit`` bytes before reading it (CheckpointError)."""
    try:
        size = storage.size(uri)
    except FileNotFoundError:
        raise CheckpointError(f"{uri}: {what} file missing") from None
    if size > limit:
        raise CheckpointError(f"{uri}: {what} file is {size:,} bytes; the limit is {limit:,}")
    return storage.read_bytes(uri)


def _verified(uri: str, expected: Optional[str], what: str, limit: int) -> bytes:
    data = read_limited(uri, limit, what)
    if expected is None or _sha256(data) != expected:
        raise CheckpointError(f"{uri}: {what} do not match the SHA-256 recorded in {META_FILE}; refusing to load")
    return data


def validate_meta(meta: Any, where: str) -> dict:
    """Check a ``meta.json`` (untrusted): format, the fixed weights file name, hashes, labels, preprocessing and the
    model description. Returns it; raises :class:`CheckpointError` naming what is wrong."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("format_version") not in (1, FORMAT_VERSION):
        raise CheckpointError(f"{where}: not a {FORMAT} v1-v{FORMAT_VERSION} checkpoint")
    if meta.get("weights_file") != WEIGHTS_FILE:
        raise CheckpointError(f"{where}: weights_file must be {WEIGHTS_FILE!r}, got {meta.get('weights_file')!r}")
    for key in ("weights_sha256", "train_state_sha256"):
        if key in meta and not (isinstance(meta[key], str) and SHA256_HEX.match(meta[key])):
            raise CheckpointError(f"{where}: {key} must be 64 lowercase hex digits")
    if "weights_sha256" not in meta:
        raise CheckpointError(f"{where}: weights_sha256 is missing")
    if meta.get("labels") != list(LABELS):
        raise CheckpointError(f"{where}: labels must be {list(LABELS)}, got {meta.get('labels')!r}")
    try:
        Preprocessing.from_dict(meta.get("preprocessing")).validate()
    except (TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{where}: invalid preprocessing: {exc}") from None
    try:
        Calibration.from_dict(meta.get("calibration"))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: invalid calibration: {exc}") from None
    model_config_of(meta, where)
    return meta


def read_meta(location: str) -> dict:
    """``meta.json`` of a checkpoint (local, ``s3://`` or via ``best.json``), validated, without loading weights."""
    location = resolve_location(location)
    uri = storage.join(location, META_FILE)
    if not storage.exists(uri):
        raise CheckpointError(f"{location}: not a checkpoint ({META_FILE} not found)")
    try:
        meta = json.loads(read_limited(uri, MAX_META_BYTES, "meta"))
    except ValueError as exc:
        raise CheckpointError(f"{uri}: not valid JSON ({exc})") from None
    return validate_meta(meta, uri)


def pin(location: str, expected_sha256: Optional[str] = None) -> tuple[str, str]:
    """``(concrete checkpoint location, its weights' SHA-256)`` for a location that may be a ``best.json``.

    Serve resolves the pointer once, when the application is built, and hands every replica the concrete
    checkpoint and its hash: replicas started later by autoscaling then load exactly that model, even after a
    retrain has rewritten ``best.json``. ``expected_sha256`` pins a model: any other is refused here.
    """
    concrete = resolve_location(location)
    meta = read_meta(concrete)
    if expected_sha256 is not None and meta["weights_sha256"] != expected_sha256:
        raise CheckpointError(f"{location}: its weights have SHA-256 {meta['weights_sha256'][:12]}..., not the pinned "
                              f"{expected_sha256[:12]}...; refusing to serve it")
    return concrete, meta["weights_sha256"]


def load_checkpoint(location: str, map_location: str | torch.device = "cpu", with_train_state: bool = False,
                    expected_sha256: Optional[str] = None) -> LoadedCheckpoint:
    """Rebuild the model of a checkpoint (local path, ``s3://`` URI or ``best.json``), verifying its SHA-256.

    Only the checkpoint's fixed file names are read, each with a size limit, straight into memory: nothing is
    copied to disk and no name from a listing or from ``meta.json`` becomes a path. ``expected_sha256`` pins the
    weights: a checkpoint whose weights hash differently is refused.
    """
    source = resolve_location(location)
    meta = read_meta(source)
    if expected_sha256 is not None and meta["weights_sha256"] != expected_sha256:
        raise CheckpointError(f"{source}: its weights have SHA-256 {meta['weights_sha256'][:12]}..., not the expected "
                              f"{expected_sha256[:12]}...; refusing to load")
    weights = _verified(storage.join(source, WEIGHTS_FILE), meta["weights_sha256"], "weights", MAX_WEIGHTS_BYTES)
    state = torch.load(io.BytesIO(weights), map_location=map_location, weights_only=True)
    model = GenderNet(model_config_of(meta, source))
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{source}: weights do not fit the model its {META_FILE} describes: {exc}") from None
    model.eval()
    train_state = None
    if with_train_state and meta.get("train_state_sha256"):
        data = _verified(storage.join(source, TRAIN_STATE_FILE), meta["train_state_sha256"], "train state",
                         MAX_WEIGHTS_BYTES)
        train_state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    return LoadedCheckpoint(model=model, meta=meta, preprocessing=Preprocessing.from_dict(meta["preprocessing"]),
                            source=source, train_state=train_state)
