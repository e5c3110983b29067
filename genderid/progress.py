"""Progress bars for the long steps (prepare, each epoch's batches, a sweep's trials, evaluation), with tqdm. Pure.

Bars go to stderr and are drawn only where a person watches: in a terminal, or where ``GENDERID_PROGRESS=1``
asks for them (``0`` turns them off everywhere). In logs and pipes (CI, Ray Job logs) the one-line step and
epoch messages say the same without a redrawn bar per refresh. Training workers draw their bars through Ray's
``tqdm_ray`` (see :mod:`genderid.train_ray`), which the driver renders; whether they draw is decided here, on the
driver, where the terminal is.
"""
from __future__ import annotations

import os
import sys
from typing import Iterable, Optional

from tqdm.auto import tqdm

PROGRESS_ENV = "GENDERID_PROGRESS"
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar:24}| {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}{postfix}]"


def enabled(stream=None) -> bool:
    """Whether bars are drawn: ``GENDERID_PROGRESS`` when set, else whether ``stream`` (stderr) is a terminal."""
    setting = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if setting in ("1", "true", "yes", "on"):
        return True
    if setting in ("0", "false", "no", "off"):
        return False
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def bar(total: Optional[int], desc: str, unit: str, show: Optional[bool] = None, stream=None) -> tqdm:
    """A bar over ``total`` ``unit``s (no-op when not :func:`enabled`); close it, or use it as a context."""
    stream = sys.stderr if stream is None else stream
    return tqdm(total=total, desc=desc, unit=unit, file=stream, bar_format=BAR_FORMAT, dynamic_ncols=True,
                leave=True, mininterval=0.5, disable=not (enabled(stream) if show is None else show))


def track(items: Iterable, total: Optional[int], desc: str, unit: str, show: Optional[bool] = None, stream=None):
    """Yield ``items`` while a bar counts them."""
    with bar(total, desc, unit, show, stream) as progress:
        for item in items:
            yield item
            progress.update(1)
