"""What the HTTP endpoint accepts, and how one uploaded image becomes model input. Pure: no Ray, no web framework.

Every request is checked and decoded here, before it may join a batch, so a bad upload is answered on its own
(400 / 413 / 415) and never reaches the model together with other people's images.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import numpy as np

from PIL import Image

from genderid.preprocess import ImageDecodeError, ImageTooLargeError, Preprocessing, open_image

# Media types accepted for a raw body or a multipart part; anything else is 415.
GENERIC_BINARY = "application/octet-stream"
MULTIPART = "multipart/form-data"


# Why a request was refused, by its status: the `reason` label of the rejected-inputs metric.
REJECTION_REASONS = {400: "bad_input", 408: "body_timeout", 413: "too_large", 415: "unsupported_type"}


class RequestError(Exception):
    """A request the endpoint refuses: ``status`` is the HTTP code, ``message`` goes to the client as JSON."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

    @property
    def reason(self) -> str:
        return REJECTION_REASONS.get(self.status, "other")


@dataclass(frozen=True)
class Limits:
    """Input limits of the endpoint (``serve_config.yaml``'s application args)."""

    max_body_bytes: int = 10_000_000
    # Pixels decoded per image (a JPEG counts at its draft size). Measured peak decode memory at 16 MP: RGBA
    # WebP 254 MB, RGBA PNG 124 MB, 16-bit grey PNG 33 MB (benchmarks/RESULTS.md): one decode stays well
    # under a replica's memory, and a 24 MP JPEG photo still passes (it decodes at reduced scale).
    max_pixels: int = 16_000_000
    max_files: int = 16
    body_timeout_s: float = 10.0  # the whole body must arrive within this, or 408: slow clients free their slot

    def __post_init__(self):
        for name in ("max_body_bytes", "max_pixels", "max_files", "body_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")

    def check_declared_length(self, content_length: Optional[str]) -> None:
        """Refuse a body by its ``Content-Length`` header, before reading any of it."""
        if content_length is None:
            return  # chunked: counted while it is read
        try:
            length = int(content_length)
        except ValueError:
            raise RequestError(400, f"invalid Content-Length header: {content_length!r}") from None
        if length > self.max_body_bytes:
            raise RequestError(413, f"request body is {length:,} bytes; the limit is {self.max_body_bytes:,}")

    def check_read_length(self, length_so_far: int) -> None:
        """Refuse a body as soon as more of it has arrived than the limit allows."""
        if length_so_far > self.max_body_bytes:
            raise RequestError(413, f"request body exceeds the limit of {self.max_body_bytes:,} bytes")


def media_type(content_type: Optional[str]) -> str:
    """``"image/jpeg; charset=x"`` -> ``"image/jpeg"``; ``""`` when absent."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def check_image_type(content_type: Optional[str], what: str = "request body") -> None:
    """415 unless the declared type is an image (any ``image/*``) or generic binary data."""
    kind = media_type(content_type)
    if kind.startswith("image/") or kind == GENERIC_BINARY:
        return
    shown = kind or "no Content-Type"
    raise RequestError(415, f"{what}: unsupported media type {shown!r}; send an image (Content-Type image/jpeg, "
                            f"image/png, ...) or multipart/form-data with 'file' fields")


# The formats the endpoint decodes, by their magic bytes. Only these decoders ever see request bytes: PIL's many
# others (TIFF, PSD, EPS, ...) are a large attack surface and nothing users send from a camera or a browser.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP")
_SIGNATURES = {"JPEG": (b"\xff\xd8\xff",), "PNG": (b"\x89PNG\r\n\x1a\n",)}
# Other image formats, recognised only to answer 415 (a known image we do not take) rather than 400 (not an image).
_OTHER_IMAGES = {"TIFF": (b"II*\x00", b"MM\x00*"), "GIF": (b"GIF87a", b"GIF89a"), "BMP": (b"BM",),
                 "PSD": (b"8BPS",), "EPS": (b"%!PS", b"\xc5\xd0\xd3\xc6"), "ICO": (b"\x00\x00\x01\x00",),
                 "JPEG 2000": (b"\x00\x00\x00\x0cjP  ",), "HEIF/AVIF": (b"ftyp",)}


def sniff_format(data: bytes) -> Optional[str]:
    """``JPEG``, ``PNG`` or ``WEBP`` from the first bytes, else None."""
    for name, signatures in _SIGNATURES.items():
        if data.startswith(signatures):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _other_image_format(data: bytes) -> Optional[str]:
    for name, signatures in _OTHER_IMAGES.items():
        if data.startswith(signatures) or (name == "HEIF/AVIF" and data[4:8] in signatures):
            return name
    return None


def accepted_format(data: bytes, what: str = "image") -> str:
    """``JPEG``, ``PNG`` or ``WEBP`` from the magic bytes, or a :class:`RequestError` (400 / 415)."""
    if not data:
        raise RequestError(400, f"{what}: empty body")
    kind = sniff_format(data)
    if kind is None:
        other = _other_image_format(data)
        if other:
            raise RequestError(415, f"{what}: {other} images are not accepted; send JPEG, PNG or WebP")
        raise RequestError(400, f"{what}: not a JPEG, PNG or WebP image")
    return kind


@contextlib.contextmanager
def _as_request_errors(what: str):
    """A decode's image errors as the HTTP answers they are: too large -> 413, undecodable -> 400."""
    try:
        yield
    except ImageTooLargeError as exc:
        raise RequestError(413, f"{what}: {exc}") from None
    except ImageDecodeError as exc:
        raise RequestError(400, f"{what}: {exc}") from None


def decode_photo(data: bytes, limits: Limits, what: str = "photo") -> Image.Image:
    """A whole uploaded photo (RGB, EXIF orientation applied, full size within ``max_pixels``) for face detection."""
    kind = accepted_format(data, what)
    with _as_request_errors(what):
        return open_image(data, max_pixels=limits.max_pixels, formats=(kind,))


def decode_upload(data: bytes, preprocessing: Preprocessing, limits: Limits, what: str = "image") -> np.ndarray:
    """One uploaded image -> the model's CHW float32 input, or a :class:`RequestError` (400 / 413 / 415)."""
    kind = accepted_format(data, what)
    with _as_request_errors(what):
        return preprocessing(data, max_pixels=limits.max_pixels, formats=(kind,))
