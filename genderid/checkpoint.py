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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from genderid import storage
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
                    train_state: Optional[dict] = None, history: Optional[list] = None) -> Path:
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
        "history": history or [], "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
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
    def labels(self) -> list[str]:
        return list(self.meta["labels"])


def resolve_location(location: str) -> str:
    """A checkpoint location, following a ``best.json`` pointer if one is given."""
    location = str(location)
    if location.endswith(".json"):
        if not storage.exists(location):
            raise CheckpointError(f"{location}: pointer file not found")
        try:
            pointer = json.loads(storage.read_bytes(location))
            return str(pointer["checkpoint"])
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{location}: not a best.json pointer (needs a 'checkpoint' key)") from None
    return location


def _verified(path: Path, expected: Optional[str], what: str) -> bytes:
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} file missing")
    data = path.read_bytes()
    if expected is None or _sha256(data) != expected:
        raise CheckpointError(f"{path}: {what} do not match the SHA-256 recorded in {META_FILE}; refusing to load")
    return data


def read_meta(location: str) -> dict:
    """``meta.json`` of a checkpoint (local, ``s3://`` or via ``best.json``) without loading weights."""
    location = resolve_location(location)
    uri = storage.join(location, META_FILE)
    if not storage.exists(uri):
        raise CheckpointError(f"{location}: not a checkpoint ({META_FILE} not found)")
    return json.loads(storage.read_bytes(uri))


def load_checkpoint(location: str, map_location: str | torch.device = "cpu",
                    with_train_state: bool = False) -> LoadedCheckpoint:
    """Rebuild the model of a checkpoint (local path, ``s3://`` URI or ``best.json``), verifying its SHA-256."""
    source = resolve_location(location)
    if not storage.exists(source):
        raise CheckpointError(f"{source}: checkpoint not found")
    directory = storage.download_dir(source)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{source}: not a checkpoint ({META_FILE} not found)")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{meta_path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("format_version") not in (1, FORMAT_VERSION):
        raise CheckpointError(f"{meta_path}: not a {FORMAT} v1-v{FORMAT_VERSION} checkpoint")
    model_config = model_config_of(meta, str(meta_path))
    weights = _verified(directory / meta["weights_file"], meta.get("weights_sha256"), "weights")
    state = torch.load(io.BytesIO(weights), map_location=map_location, weights_only=True)
    model = GenderNet(model_config)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: weights do not fit the model its {META_FILE} describes: {exc}") from None
    model.eval()
    train_state = None
    if with_train_state and meta.get("train_state_sha256"):
        data = _verified(directory / TRAIN_STATE_FILE, meta["train_state_sha256"], "train state")
        train_state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    return LoadedCheckpoint(model=model, meta=meta, preprocessing=Preprocessing.from_dict(meta["preprocessing"]),
                            source=source, train_state=train_state)
