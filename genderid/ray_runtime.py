"""Joining or starting Ray: the one place that calls ``ray.init``."""
from __future__ import annotations


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
