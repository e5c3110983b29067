"""Joining or starting Ray (the one place that calls ``ray.init``), and the driver's own signal handlers kept
across Ray's ``fit()`` calls."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


def init_ray(**kwargs) -> None:
    """Join the cluster in ``RAY_ADDRESS``, or start a local one; no-op when Ray is already up."""
    import ray

    if ray.is_initialized():
        return
    # Ray 2.60 logs its own progress; keep the driver's console for ours and the Data progress bars.
    from genderid.console import quiet_ray, verbose

    kwargs.setdefault("logging_level", "INFO" if verbose() else "ERROR")
    # The dashboard stays on even for a local Ray: Train V2's placement-group cleaner asks the State API (served
    # by the dashboard) whether a finished run's controller is gone; without it the group is never released and
    # the next Tune trial waits for CPUs forever.
    ray.init(**kwargs)
    quiet_ray()


@contextlib.contextmanager
def caller_signal_handlers() -> Iterator[None]:
    """Around a Ray Train or Tune ``fit()``: give the caller back its own Ctrl-C (SIGINT) and SIGUSR1 handlers.

    Ray 2.60's ``fit()`` installs handlers that stop *that* run and leaves them installed when it returns. Train's
    holds the finished run's controller, so that actor and its dataset coordinators stay alive as long as the
    process does (a demo that serves after training, a notebook), and the caller's next Ctrl-C goes to the gone
    run instead of interrupting the caller: it takes three presses. Tune's swallows the next one.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread has signal handlers; fit() installs none from other threads
        return
    signals = [signal.SIGINT] + ([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])
    saved = {sig: signal.getsignal(sig) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:  # None: set from outside Python, so there is nothing Python can put back
                signal.signal(sig, handler)
