"""What the HTTP endpoint accepts, and how one uploaded image becomes model input. Pure: no Ray, no web framework.

Every request is checked and decoded here, before it may join a batch, so a bad upload is answered on its own
(400 / 413 / 415) and never reaches the model together with other people's images.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from genderid.preprocess import ImageDecodeError, ImageTooLargeError, Preprocessing

# Media types accepted for a raw body or a multipart part; anything else is 415.
GENERIC_BINARY = "application/octet-stream"
MULTIPART = "multipart/form-data"


class RequestError(Exception):
    """A request the endpoint refuses: ``status`` is the HTTP code, ``message`` goes to the client as JSON."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Limits:
    """Input limits of the endpoint (``serve_config.yaml``'s application args)."""

    max_body_bytes: int = 10_000_000
    max_pixels: int = 40_000_000
    max_files: int = 16

    def __post_init__(self):
        for name in ("max_body_bytes", "max_pixels", "max_files"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")

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


def decode_upload(data: bytes, preprocessing: Preprocessing, limits: Limits, what: str = "image") -> np.ndarray:
    """One uploaded image -> the model's CHW float32 input, or a :class:`RequestError` (400 / 413)."""
    if not data:
        raise RequestError(400, f"{what}: empty body")
    try:
        return preprocessing(data, max_pixels=limits.max_pixels)
    except ImageTooLargeError as exc:
        raise RequestError(413, f"{what}: {exc}") from None
    except ImageDecodeError as exc:
        raise RequestError(400, f"{what}: {exc}") from None
