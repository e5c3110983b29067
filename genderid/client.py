"""A small HTTP client for the Serve endpoint (stdlib only): what `genderid predict --url` uses."""
from __future__ import annotations

import json
import mimetypes
import urllib.error
import urllib.request
from pathlib import Path

from genderid.errors import UserError


class EndpointError(UserError, RuntimeError):
    """The endpoint answered with an error, or could not be reached."""


def predict_url(url: str, image: str | Path, timeout: float = 60.0, route: str = "predict") -> dict:
    """POST one image file as a raw body to ``<url>/<route>`` (``predict`` or ``faces``); returns the JSON answer."""
    path = Path(image)
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    request = urllib.request.Request(f"{url.rstrip('/')}/{route}", data=path.read_bytes(), method="POST",
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            message = exc.reason
        raise EndpointError(f"{path}: HTTP {exc.code}: {message}") from None
    except urllib.error.URLError as exc:
        raise EndpointError(f"{url}: cannot reach the endpoint ({exc.reason})") from None
