"""Joining or starting Ray: the one place that calls ``ray.init``."""
from __future__ import annotations

import os


def init_ray(**kwargs) -> None:
    """Join the cluster in ``RAY_ADDRESS``, or start a local one; no-op when Ray is already up."""
    import ray

    if ray.is_initialized():
        return
    # Ray 2.60 logs its own progress; keep the driver's console for ours and the Data progress bars.
    kwargs.setdefault("logging_level", "WARNING")
    if not os.environ.get("RAY_ADDRESS"):
        kwargs.setdefault("include_dashboard", False)
    ray.init(**kwargs)
