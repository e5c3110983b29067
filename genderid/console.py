"""What the driver's console shows: genderid's own progress and results, not Ray's internals. Ray glue.

By default the lines that Ray forwards from its workers and daemons (raylet warnings, GCS notices, Data execution
plans, every worker's stray output) are not printed; only genderid's own progress lines are, once each, without
Ray's ``(RayTrainWorker pid=...)`` prefix, and Ray's ``tqdm_ray`` progress bars still render. Ray's Python loggers
print errors only. ``--verbose`` or ``GENDERID_LOG=debug`` restores all of it. Either way Ray's log files under its
session folder get everything, as usual.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading

LOG_ENV = "GENDERID_LOG"
# Lines our workers print for the user (train_ray's epoch lines, tune_ray's resume notice).
OWN_PREFIXES = ("[train]", "[tune]")
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")
HANDLER = "genderid_console"

_printed: set[str] = set()
_lock = threading.Lock()
_console = sys.stdout  # where our lines go, even while Ray's own prints are silenced (see silence_prints)


def verbose() -> bool:
    """Ray's own logs on the console too (``--verbose`` sets ``GENDERID_LOG=debug``)."""
    return os.environ.get(LOG_ENV, "").strip().lower() in ("debug", "verbose")


def set_verbose() -> None:
    os.environ[LOG_ENV] = "debug"  # children (Ray Jobs, the demo's subprocesses) inherit it


def own_lines(lines, printed: set[str]) -> list[str]:
    """The lines of a forwarded batch that the console shows: genderid's own, each text once. Pure."""
    shown = []
    for line in lines:
        text = line.strip()
        if text.startswith(OWN_PREFIXES) and text not in printed:
            printed.add(text)
            shown.append(text)
    return shown


_worker_bars: dict = {}  # tqdm_ray bar id -> the driver's bar that draws it


def draw_worker_bar(state: dict, bars: dict) -> None:
    """Draw a ``tqdm_ray`` bar's state (sent by a worker as a magic line) as one of our bars, by its desc alone:
    without Ray's ``(pid=...)`` prefix."""
    from genderid import progress

    key = state.get("uuid")
    bar = bars.get(key)
    if bar is None:
        if state.get("closed"):
            return
        bar = bars[key] = progress.bar(state.get("total"), str(state.get("desc", "")), str(state.get("unit", "it")),
                                       show=True)
    done = int(state.get("x", 0))
    bar.total = max(int(state.get("total") or 0), done) or None  # an estimate that a rank outran grows with it
    bar.update(max(0, done - bar.n))
    if state.get("closed"):
        bar.close()
        del bars[key]


def _print_own(data: dict) -> None:
    import json

    from ray._private.worker import RAY_TQDM_MAGIC

    lines = data.get("lines", [])
    for line in lines:
        if RAY_TQDM_MAGIC in line:  # a worker's tqdm_ray bar (it draws only where genderid.progress said so)
            try:
                with _lock:
                    draw_worker_bar(json.loads(line), _worker_bars)
            except (ValueError, TypeError):
                pass
    with _lock:
        shown = own_lines(lines, _printed)
    if shown:
        from tqdm import tqdm

        with tqdm.external_write_mode():  # lift the progress bars off the line, print, draw them again
            for text in shown:
                print(text, file=_console, flush=True)


def _drop_daemon_notices(original):
    """Ray prints its daemons' notices (raylet worker-pool warnings, retried tasks) with this function, outside the
    dispatcher; keep them in the log files only."""
    def print_to_stdstream(data, ignore_prefix: bool = False):
        if data.get("pid") in ("raylet", "autoscaler"):
            return
        original(data, ignore_prefix=ignore_prefix)

    print_to_stdstream.genderid_quiet = True
    return print_to_stdstream


@contextlib.contextmanager
def silence_prints():
    """Drop what is printed to stdout inside the block (Tune's experiment banner and status tables), unless
    verbose; our forwarded lines still reach the console."""
    if verbose():
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def quiet_ray() -> None:
    """After ``ray.init``: keep Ray's forwarded logs and its loggers off the console (unless verbose)."""
    if verbose():
        return
    import ray.data  # noqa: F401  (configures its loggers on import: import it first, then quiet them)

    for name in RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # a Ray without the dispatcher: its logs stay on, nothing breaks
        return
    global _console
    _console = sys.stdout
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler(HANDLER)
    dispatcher.add_handler(HANDLER, _print_own)
    import ray._private.worker as ray_worker

    if not getattr(ray_worker.print_to_stdstream, "genderid_quiet", False):
        ray_worker.print_to_stdstream = _drop_daemon_notices(ray_worker.print_to_stdstream)
