"""Releasing what a killed driver left reserved on a Ray cluster. Ray glue only.

Why this exists (measured with Ray 2.60, see ``tests/distributed/test_tune_ray.py``): when a sweep's driver is
killed hard (SIGKILL, OOM), the running trial's Train controller can create a new worker placement group while
its job is being torn down. That group's creator job is dead, yet the group stays ``CREATED`` and keeps its CPUs
reserved. On a small cluster the resumed sweep then waits forever: Ray Data's Parquet sampling cannot get its CPU.

A non-detached placement group whose creator job is dead should not exist (Ray removes such groups itself once
both their creator job and creator actor are dead), so removing it restores Ray's own lifetime rule; live jobs'
groups and detached groups are never touched.

The killed driver's trials and Train workers themselves die with it, but a hop at a time along their owners (the
trial, its Train controller, its workers): CI saw a worker finish an epoch and write its history after the kill.
A rerun that resumed meanwhile would have two runs writing one run folder, so it waits for them first.
"""
from __future__ import annotations

import logging
import time

from ray.tune import Callback

logger = logging.getLogger(__name__)

# Job states in which a driver still owns what it created (the State API's JobStatus values).
LIVE_JOB_STATES = {"RUNNING", "PENDING"}
RESERVED_STATES = {"CREATED", "PENDING", "RESCHEDULING"}


# The actors that write into a run's folder: a Tune function trial, a Train run's controller and its workers.
RUN_ACTOR_CLASSES = {"ImplicitFunc", "TrainController", "RayTrainWorker"}


def _records(listing) -> list[dict]:
    """State API records as dicts (Ray hands out dataclasses or dicts depending on the call)."""
    return [item if isinstance(item, dict) else item.__dict__ for item in listing]


def _jobs() -> list[dict]:
    from ray.util.state import list_jobs

    return _records(list_jobs(limit=10_000, raise_on_missing_output=False))


def _job_status(jobs: list[dict]) -> dict:
    return {job.get("job_id"): str(getattr(job.get("status"), "value", job.get("status"))).upper()
            for job in jobs if job.get("job_id")}


def actors_of_dead_jobs(actors: list[dict], jobs: list[dict]) -> list[str]:
    """The ids of the :data:`RUN_ACTOR_CLASSES` ``actors`` still alive on behalf of a job that is no longer alive.

    ``actors`` are State API records (``actor_id``, ``class_name``, ``state``, ``job_id``, ``is_detached``). Other
    classes are left alone: a Serve replica's job is the long-gone one that deployed it. So is an actor whose job is
    not listed (the listing may be truncated).
    """
    status = _job_status(jobs)
    return [actor["actor_id"] for actor in actors
            if actor.get("class_name") in RUN_ACTOR_CLASSES and actor.get("state") == "ALIVE"
            and not actor.get("is_detached") and actor.get("job_id") in status
            and status[actor["job_id"]] not in LIVE_JOB_STATES]


def wait_for_dead_jobs_runs(timeout_s: float = 60.0, poll_s: float = 1.0) -> int:
    """Wait until the trials and Train runs of killed drivers have ended (Ray ends them on its own, a moment
    after the driver); returns how many were alive at first. Needs the State API; failures to query are logged
    and end the wait, and after ``timeout_s`` the run goes ahead with a warning: this must never fail a run."""
    from ray.util.state import list_actors

    deadline, first = time.monotonic() + timeout_s, None
    while True:
        try:
            actors = _records(list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=10_000,
                                          raise_on_missing_output=False))
            jobs = _jobs()
        except Exception as exc:  # the State API is best effort here
            logger.warning("could not list actors to wait for a killed run's: %s", exc)
            return first or 0
        alive = actors_of_dead_jobs(actors, jobs)
        if first is None:
            first = len(alive)
            if alive:
                print(f"[genderid] waiting for {len(alive)} actor(s) of a killed run to end", flush=True)
        if not alive:
            return first
        if time.monotonic() >= deadline:
            logger.warning("%d actor(s) of a killed run still alive after %.0f s; going ahead", len(alive), timeout_s)
            return first
        time.sleep(poll_s)


def orphaned_placement_groups(groups: list[dict], jobs: list[dict]) -> list[str]:
    """The ids of ``groups`` that hold or wait for resources on behalf of a job that is no longer alive.

    ``groups`` and ``jobs`` are State API records (``placement_group_id``, ``creator_job_id``, ``state``,
    ``is_detached``; ``job_id``, ``status``). A group whose creator job is not listed at all is left alone:
    the listing may be truncated, and guessing wrong would kill a live run.
    """
    status = _job_status(jobs)
    orphans = []
    for group in groups:
        creator = group.get("creator_job_id")
        if group.get("is_detached") or group.get("state") not in RESERVED_STATES or creator not in status:
            continue
        if status[creator] not in LIVE_JOB_STATES:
            orphans.append(group["placement_group_id"])
    return orphans


def release_orphaned_placement_groups() -> list[str]:
    """Remove the placement groups of dead jobs on the connected cluster; returns their ids.

    Needs the State API (the dashboard). Failures to query are logged and ignored: cleaning up must never be
    what fails a sweep.
    """
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group
    from ray.util.state import list_placement_groups

    try:
        groups = _records(list_placement_groups(detail=True, limit=10_000, raise_on_missing_output=False))
        jobs = _jobs()
    except Exception as exc:  # the State API is best effort here
        logger.warning("could not list placement groups to release orphans: %s", exc)
        return []
    released = []
    for group_id in orphaned_placement_groups(groups, jobs):
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group_id)))
            released.append(group_id)
        except Exception as exc:
            logger.warning("could not remove orphaned placement group %s: %s", group_id, exc)
    if released:
        print(f"[genderid] released {len(released)} placement group(s) left reserved by a killed run",
              flush=True)
    return released


class OrphanReaper(Callback):
    """A Tune callback that releases orphaned placement groups at most every ``interval_s`` while a sweep runs.

    Once at the start is not enough: a killed run's controller may create its group a few seconds later.
    """

    def __init__(self, interval_s: float = 10.0):
        self.interval_s = interval_s
        self._last = 0.0

    def on_step_begin(self, iteration, trials, **info):
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            release_orphaned_placement_groups()
