"""Ray Serve glue: a FastAPI ingress around the pure :class:`~genderid.predictor.Predictor`.

``serve_config.yaml`` names :func:`build_app` as the application's ``import_path``; its ``args`` (validated as
:class:`ServeArgs`) hold the checkpoint, batching and input limits, and its ``deployments`` entry holds replicas,
autoscaling, concurrency and health checks. Nothing of that is fixed here.

Per request: read the body (size-limited) -> decode and validate off the event loop (bad input answered here,
alone) -> ``@serve.batch`` -> one forward pass for the whole batch in a worker thread.
"""

import asyncio
import logging
from typing import Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from genderid.checkpoint import model_description
from genderid.http_inputs import MULTIPART, Limits, RequestError, check_image_type, decode_upload, media_type

logger = logging.getLogger("ray.serve")
api = FastAPI(title="genderid", description="Male/female face classification (CelebA's binary Male label).")


class ServeArgs(BaseModel):
    """The application's ``args`` in ``serve_config.yaml``."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(description="checkpoint directory, best.json, or s3:// URI of either")
    report: Optional[str] = Field(None, description="optional report.json of `genderid evaluate` for /metadata")
    max_batch_size: int = Field(8, ge=1, description="images per forward pass (1 turns batching off)")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="how long a batch waits to fill")
    max_body_bytes: int = Field(10_000_000, ge=1)
    max_pixels: int = Field(40_000_000, ge=1)
    max_files: int = Field(16, ge=1, description="most `file` fields in one multipart request")
    torch_threads: int = Field(1, ge=1, description="intra-op threads per replica; match ray_actor_options.num_cpus")
    device: str = Field("auto", description="auto (cuda when the replica has a GPU), cpu or cuda")


@api.exception_handler(RequestError)
async def _request_error(_request: Request, exc: RequestError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)


@api.exception_handler(Exception)
async def _internal_error(_request: Request, exc: Exception) -> JSONResponse:
    # The client gets no stack trace; the replica log has it.
    logger.exception("genderid: unexpected error while serving a request")
    return JSONResponse({"error": "internal error (see the replica log)"}, status_code=500)


async def _read_body(request: Request, limits: Limits) -> bytes:
    limits.check_declared_length(request.headers.get("content-length"))
    chunks, size = [], 0
    async for chunk in request.stream():  # counted as it arrives: a chunked upload cannot exceed the limit either
        size += len(chunk)
        limits.check_read_length(size)
        chunks.append(chunk)
    return b"".join(chunks)


async def _multipart_files(request: Request, body: bytes, limits: Limits) -> list[tuple[str, bytes]]:
    async def stream():
        yield body

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=limits.max_files,
                                     max_fields=limits.max_files).parse()
    except MultiPartException as exc:
        raise RequestError(400, f"malformed multipart body: {exc.message}") from None
    uploads = form.getlist("file")
    if not uploads:
        raise RequestError(400, "multipart body has no 'file' field")
    files = []
    for index, upload in enumerate(uploads):
        what = f"file {index + 1} ({getattr(upload, 'filename', None) or 'unnamed'})"
        if isinstance(upload, str):
            raise RequestError(400, f"{what}: 'file' must be a file upload, not a text field")
        check_image_type(upload.content_type or "application/octet-stream", what)
        files.append((what, await upload.read()))
    return files


@serve.deployment
@serve.ingress(api)
class GenderIdService:
    """One replica: a loaded predictor behind ``/predict``, ``/healthz`` and ``/metadata``."""

    def __init__(self, args: dict):
        import torch

        from genderid import storage
        from genderid.checkpoint import CheckpointError
        from genderid.predictor import Predictor

        self.args = ServeArgs.model_validate(args)
        self.limits = Limits(self.args.max_body_bytes, self.args.max_pixels, self.args.max_files)
        torch.set_num_threads(self.args.torch_threads)
        device = self.args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.predictor = Predictor.from_checkpoint(self.args.checkpoint, device=device,
                                                       batch_size=self.args.max_batch_size)
        except (CheckpointError, OSError) as exc:
            # One clear line in the replica log and in `serve status`; the replica does not start.
            logger.error("genderid: cannot load checkpoint %s: %s", self.args.checkpoint, exc)
            raise RuntimeError(f"genderid: cannot load checkpoint {self.args.checkpoint}: {exc}") from None
        self.test_metrics = None
        if self.args.report:
            import json

            from genderid.report import summary

            self.test_metrics = summary(json.loads(storage.read_bytes(self.args.report)))
        self._infer.set_max_batch_size(self.args.max_batch_size)
        self._infer.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
        logger.info("genderid: serving model %s from %s on %s", self.predictor.model_version,
                    self.predictor.checkpoint.source, device)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)  # replaced from the args in __init__
    async def _infer(self, arrays: list[np.ndarray]) -> list[dict]:
        predictions = await asyncio.to_thread(self.predictor.predict_arrays, np.stack(arrays))
        version = self.predictor.model_version
        return [p.to_dict(version) for p in predictions]

    async def _decode(self, data: bytes, what: str) -> np.ndarray:
        return await asyncio.to_thread(decode_upload, data, self.predictor.preprocessing, self.limits, what)

    @api.post("/predict")
    async def predict(self, request: Request) -> dict:
        """A raw image body -> one prediction; multipart ``file`` fields -> one per file, in order."""
        body = await _read_body(request, self.limits)
        kind = media_type(request.headers.get("content-type"))
        if kind == MULTIPART:
            files = await _multipart_files(request, body, self.limits)
        else:
            check_image_type(kind)
            files = [("request body", body)]
        # Every image is decoded and checked before any joins a batch: a bad one fails only its own request.
        arrays = await asyncio.gather(*(self._decode(data, what) for what, data in files))
        predictions = await asyncio.gather(*(self._infer(array) for array in arrays))
        if len(predictions) == 1:
            return predictions[0]
        return {"predictions": list(predictions)}

    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/metadata")
    def metadata(self) -> dict:
        loaded = self.predictor.checkpoint
        meta = loaded.meta
        return {
            "model_version": loaded.version, "checkpoint": loaded.source, "labels": loaded.labels,
            "input_size": list(self.predictor.preprocessing.image_size), "preprocessing": meta["preprocessing"],
            "architecture": model_description(loaded.model), "epoch": meta.get("epoch"),
            "validation_metrics": {k: v for k, v in meta.get("metrics", {}).items() if k.startswith("val_")},
            "test_metrics": self.test_metrics,
            "batching": {"max_batch_size": self.args.max_batch_size,
                         "batch_wait_timeout_s": self.args.batch_wait_timeout_s},
            "limits": {"max_body_bytes": self.limits.max_body_bytes, "max_pixels": self.limits.max_pixels,
                       "max_files": self.limits.max_files},
        }


def build_app(args: ServeArgs) -> serve.Application:
    """The application builder named by ``serve_config.yaml`` (``genderid.serve_app:build_app``).

    The checkpoint's ``meta.json`` is read here, so a missing or mistyped location fails the deploy with a clear
    message before any running replica is replaced.
    """
    from genderid.checkpoint import read_meta

    read_meta(args.checkpoint)
    return GenderIdService.bind(args.model_dump())
