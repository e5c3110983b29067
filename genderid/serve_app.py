"""Ray Serve glue: a FastAPI ingress around the pure :class:`~genderid.predictor.Predictor`.

``serve_config.yaml`` names :func:`build_app` as the application's ``import_path``; its ``args`` (validated as
:class:`ServeArgs`) hold the checkpoint, batching and input limits, and its ``deployments`` entry holds replicas,
autoscaling, concurrency and health checks. Nothing of that is fixed here.

Per request: read the body (size- and time-limited) -> decode and validate in a bounded pool (bad input answered
here, alone) -> the continuous batcher (:mod:`genderid.batching`) -> one forward pass per batch in a worker thread.
"""

import asyncio
import base64
import functools
import html
import importlib.resources
import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from genderid.batching import ContinuousBatcher
from genderid.checkpoint import model_description
from genderid.predictor import faces_answer
from genderid.serve_metrics import metrics
from genderid.http_inputs import (MULTIPART, Limits, RequestError, check_image_type, decode_photo, decode_upload,
                                  media_type)

logger = logging.getLogger("ray.serve")


class _PackageFile:
    """A file shipped in the package, read once (replicas import this module; reading is lazy)."""

    def __init__(self, name: str):
        self.name = name
        self._text: Optional[str] = None

    def read(self) -> str:
        if self._text is None:
            self._text = (importlib.resources.files("genderid") / "web" / self.name).read_text(encoding="utf-8")
        return self._text


WEB_PAGE = _PackageFile("index.html")
WEB_FILES = {"app.js": _PackageFile("app.js"), "style.css": _PackageFile("style.css")}
WEB_TYPES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
# The page may load and call only this endpoint: no CDN, no analytics, nothing leaves for another host.
WEB_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
                                          "frame-ancestors 'none'", "X-Content-Type-Options": "nosniff"}


def name_os_thread() -> None:
    """``ThreadPoolExecutor`` initializer: give the OS thread its Python name (``decode_0``, ``forward_0``), so
    ``top -H``, ``ps -L`` and ``/proc`` show which thread of a replica uses the CPU (Python 3.11 does not name OS
    threads; these would all show the process title they started under). Linux only; elsewhere it does nothing."""
    import ctypes
    import threading

    try:
        ctypes.CDLL(None).prctl(15, threading.current_thread().name.encode()[:15], 0, 0, 0)  # 15: PR_SET_NAME
    except (OSError, AttributeError):
        pass


def jpeg_data_url(image, quality: int = 85) -> str:
    """A small image as a ``data:image/jpeg;base64,...`` URL (the aligned crops ``/faces?crops=true`` returns)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
LIMITS = Limits()  # the defaults of the input limits live in http_inputs.Limits
api = FastAPI(title="genderid", description="Male/female face classification (CelebA's binary Male label).")


class ServeArgs(BaseModel):
    """The application's ``args`` in ``serve_config.yaml``."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(description="checkpoint directory, best.json, or s3:// URI of either")
    expected_sha256: Optional[str] = Field(None, pattern=r"^[0-9a-f]{64}$",
                                           description="pin the model: refuse a checkpoint whose weights differ")
    report: Optional[str] = Field(None, description="optional report.json of `genderid evaluate` for /metadata")
    max_batch_size: int = Field(8, ge=1, description="images per forward pass (1 turns batching off)")
    batch_wait_timeout_s: float = Field(0.0, ge=0, description="extra wait for a batch to fill once the model is "
                                                                 "free (0: take what is queued, never wait)")
    max_body_bytes: int = Field(LIMITS.max_body_bytes, ge=1, description="413 above this many body bytes")
    max_pixels: int = Field(LIMITS.max_pixels, ge=1, description="413 above this many decoded pixels per image")
    max_files: int = Field(LIMITS.max_files, ge=1, description="most `file` fields in one multipart request")
    max_faces: int = Field(16, ge=1, description="POST /faces: the largest this many faces of a photo are answered")
    body_timeout_s: float = Field(LIMITS.body_timeout_s, gt=0, description="408 when the body takes longer")
    decode_threads: int = Field(1, ge=1, description="images decoded at once per replica (memory: see max_pixels)")
    torch_threads: int = Field(1, ge=1, description="intra-op threads per replica; match ray_actor_options.num_cpus")
    device: str = Field("auto", description="auto (cuda when the replica has a GPU), cpu or cuda")
    runtime: str = Field("torch", description="what runs the model: torch or onnxruntime (genderid.runtime)")
    precision: str = Field("fp32", description="fp32, or int8 (onnxruntime; built by `genderid export` first)")
    flip_tta: bool = Field(False, description="average each face with its mirror image: two forward passes")

    @model_validator(mode="after")
    def _runtime_exists(self) -> "ServeArgs":
        from genderid.runtime import RuntimeSettings

        RuntimeSettings(self.runtime, self.precision)  # its error names the allowed values
        return self


class RequestCounter:
    """ASGI middleware: counts every HTTP request by the route that matched and the status it got (500 when the
    app raised). A plain ASGI callable, not ``@app.middleware("http")``: Starlette runs those through an extra task
    group and memory streams per request, measured with py-spy as ~40% of the replica event loop's CPU."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_and_note_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            try:  # counting must never fail a request
                from genderid.serve_metrics import metrics  # here: Serve ships this class to replicas by value

                route = getattr(scope.get("route"), "path", None) or "other"  # the route that matched, if any
                metrics().requests.inc(tags={"route": route, "status": str(status)})
            except Exception:
                logger.debug("genderid: could not count a request", exc_info=True)


api.add_middleware(RequestCounter)


@api.exception_handler(RequestError)
async def _request_error(_request: Request, exc: RequestError) -> JSONResponse:
    from genderid.serve_metrics import metrics

    try:
        metrics().rejected.inc(tags={"reason": exc.reason})
    except Exception:
        logger.debug("genderid: could not count a rejection", exc_info=True)
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
    """The whole body, within ``max_body_bytes`` and ``body_timeout_s`` (413 / 408).

    Ray Serve's proxy streams the body to the replica as it arrives, so a client that trickles it holds one of
    the replica's ongoing-request slots; the deadline gives the slot back. It is enforced here, in the app,
    because a client can lift the proxy's own timeout with a request header.
    """
    limits.check_declared_length(request.headers.get("content-length"))

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():  # counted as it arrives: a chunked upload cannot exceed the limit
            size += len(chunk)
            limits.check_read_length(size)
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout=limits.body_timeout_s)
    except asyncio.TimeoutError:
        raise RequestError(408, f"the request body did not arrive within {limits.body_timeout_s:g} s") from None


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
    """One replica: a loaded predictor behind ``/predict``, ``/faces``, ``/healthz`` and ``/metadata``."""

    def __init__(self, args: dict):
        import torch

        from genderid import storage
        from genderid.checkpoint import CheckpointError
        from genderid.predictor import Predictor
        from genderid.runtime import RuntimeSettingError, RuntimeSettings

        self.args = ServeArgs.model_validate(args)
        self.limits = Limits(self.args.max_body_bytes, self.args.max_pixels, self.args.max_files,
                             self.args.body_timeout_s)
        # Decoding is bounded per replica: at most decode_threads images in memory at once, whatever the load.
        self._decode_pool = ThreadPoolExecutor(max_workers=self.args.decode_threads, thread_name_prefix="decode",
                                               initializer=name_os_thread)
        # The batcher runs one forward pass at a time: on a thread of its own, not asyncio's shared default pool.
        self._forward_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward", initializer=name_os_thread)
        torch.set_num_threads(self.args.torch_threads)
        device = self.args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.predictor = Predictor.from_checkpoint(self.args.checkpoint, device=device,
                                                       batch_size=self.args.max_batch_size,
                                                       expected_sha256=self.args.expected_sha256,
                                                       runtime=RuntimeSettings(self.args.runtime, self.args.precision),
                                                       flip_tta=self.args.flip_tta)
        except (CheckpointError, RuntimeSettingError, OSError) as exc:
            # One clear line in the replica log and in `serve status`; the replica does not start.
            logger.error("genderid: cannot load checkpoint %s: %s", self.args.checkpoint, exc)
            raise RuntimeError(f"genderid: cannot load checkpoint {self.args.checkpoint}: {exc}") from None
        self.predictor.front_end  # the face detector's models load now, not on the first photo
        self.test_metrics = None
        if self.args.report:
            import json

            from genderid.report import summary

            self.test_metrics = summary(json.loads(storage.read_bytes(self.args.report)))
        self.metrics = metrics()
        self._batcher = ContinuousBatcher(self._forward, self.args.max_batch_size, self.args.batch_wait_timeout_s)
        logger.info("genderid: serving model %s from %s on %s", self.predictor.model_version,
                    self.predictor.checkpoint.source, device)

    async def _infer(self, array: np.ndarray) -> dict:
        return await self._batcher.submit(array)

    async def _forward(self, arrays: list[np.ndarray]) -> list[dict]:
        started = time.perf_counter()
        predictions = await asyncio.get_running_loop().run_in_executor(self._forward_pool,
                                                                       self.predictor.predict_arrays, np.stack(arrays))
        self.metrics.forward_seconds.observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(len(arrays))
        version = self.predictor.model_version
        for prediction in predictions:
            self.metrics.predictions.inc(tags={"label": prediction.label})
        return [p.to_dict(version) for p in predictions]

    async def _decode(self, data: bytes, what: str, decode=None):
        """Decode in the bounded pool; the request stays ongoing until its decode has ended, even if cancelled."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._decode_pool, decode or self._timed_decode, data, what)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            await asyncio.wait([future])  # the thread cannot be stopped: hold the slot until it is done
            raise

    def _timed_decode(self, data: bytes, what: str) -> np.ndarray:
        started = time.perf_counter()
        try:
            return decode_upload(data, self.predictor.preprocessing, self.limits, what)
        finally:
            self.metrics.decode_seconds.observe(time.perf_counter() - started)

    def _timed_faces(self, data: bytes, what: str, crops: bool = False) -> tuple:
        """A photo -> (its faces, their aligned crops as model input, its size, the crops as JPEG data URLs when
        asked), in the decode pool."""
        started = time.perf_counter()
        try:
            photo = decode_photo(data, self.limits, what)
            self.metrics.decode_seconds.observe(time.perf_counter() - started)
            started = time.perf_counter()
            faces, arrays = self.predictor.face_inputs(photo, self.args.max_faces)
            self.metrics.detect_seconds.observe(time.perf_counter() - started)
            urls = [jpeg_data_url(face.crop) for face in faces] if crops else None
            return faces, arrays, photo.size, urls
        except RequestError:
            self.metrics.decode_seconds.observe(time.perf_counter() - started)
            raise

    async def _uploads(self, request: Request) -> list[tuple[str, bytes]]:
        """The request's images: a raw body, or its multipart ``file`` fields (within the limits)."""
        started = time.perf_counter()
        body = await _read_body(request, self.limits)
        self.metrics.body_seconds.observe(time.perf_counter() - started)
        kind = media_type(request.headers.get("content-type"))
        if kind == MULTIPART:
            return await _multipart_files(request, body, self.limits)
        check_image_type(kind)
        return [("request body", body)]

    @api.post("/faces")
    async def faces(self, request: Request, crops: bool = False) -> dict:
        """A photo -> every face in it (largest first, at most ``max_faces``): box, detection score, prediction;
        ``?crops=true`` adds each aligned crop the model saw, as a small JPEG data URL."""
        files = await self._uploads(request)
        if len(files) != 1:
            raise RequestError(400, f"POST /faces takes one photo; got {len(files)} 'file' fields")
        what, data = files[0]
        faces, arrays, size, urls = await self._decode(data, what, functools.partial(self._timed_faces, crops=crops))
        del files, data
        # The faces of one photo join the batcher together, so they share a forward pass.
        predictions = await asyncio.gather(*(self._infer(array) for array in arrays))
        answer = faces_answer(faces, predictions, size)
        for face, url in zip(answer["faces"], urls or []):
            face["crop"] = url
        return answer

    @api.get("/", response_class=HTMLResponse)
    def page(self, request: Request) -> HTMLResponse:
        """The try-it page. Its links are relative to ``<base>``: the route prefix, so it works under any prefix."""
        base = html.escape(request.scope.get("root_path", "").rstrip("/") + "/", quote=True)
        return HTMLResponse(WEB_PAGE.read().replace("{{BASE}}", base), headers=WEB_HEADERS)

    @api.get("/static/{name}")
    def static(self, name: str) -> Response:
        """The page's script and style sheet (only these names: nothing else of the package is reachable)."""
        if name not in WEB_FILES:
            raise StarletteHTTPException(404, f"no such file: {name}")
        return Response(WEB_FILES[name].read(), media_type=WEB_TYPES[name], headers=WEB_HEADERS)

    @api.post("/predict")
    async def predict(self, request: Request) -> dict:
        """A raw image body -> one prediction; multipart ``file`` fields -> one per file, in order."""
        files = await self._uploads(request)
        # Every image is decoded and checked before any joins a batch: a bad one fails only its own request. One at
        # a time: a request stops at its first bad file and never has more than one image decoding.
        arrays = [await self._decode(data, what) for what, data in files]
        del files  # a waiting request holds its small arrays, not its upload
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
            "runtime": {"runtime": self.args.runtime, "precision": self.args.precision,
                        "flip_tta": self.args.flip_tta},
            "batching": {"max_batch_size": self.args.max_batch_size,
                         "batch_wait_timeout_s": self.args.batch_wait_timeout_s},
            "limits": {"max_body_bytes": self.limits.max_body_bytes, "max_pixels": self.limits.max_pixels,
                       "max_files": self.limits.max_files, "body_timeout_s": self.limits.body_timeout_s,
                       "max_faces": self.args.max_faces},
            "calibration": {**self.predictor.calibration.to_dict(),
                            "uncertain_band": self.predictor.calibration.band()},
            "faces": self.predictor.preprocessing.faces.to_dict(),
        }


def build_app(args: ServeArgs) -> serve.Application:
    """The application builder named by ``serve_config.yaml`` (``genderid.serve_app:build_app``).

    The checkpoint's ``meta.json`` is read and validated here, so a missing or mistyped location fails the deploy
    with a clear message before any running replica is replaced. A ``best.json`` is resolved here, once: every
    replica gets the concrete checkpoint and its SHA-256, so replicas added later serve the same model.
    """
    from genderid import runtime, storage
    from genderid.checkpoint import CheckpointError, pin

    checkpoint, sha256 = pin(args.checkpoint, args.expected_sha256)
    if args.precision == "int8":  # replicas cannot calibrate (no data): the int8 model must exist before the deploy
        settings = runtime.RuntimeSettings(args.runtime, args.precision)
        if not storage.exists(runtime.export_location(checkpoint, sha256, settings)):
            raise CheckpointError(f"precision int8: {checkpoint} has no int8 model yet; build it once from val "
                                  f"images: genderid export --checkpoint {checkpoint} --data PREPARED --precision int8")
    return GenderIdService.bind(args.model_copy(update={"checkpoint": checkpoint, "expected_sha256": sha256})
                                .model_dump())
