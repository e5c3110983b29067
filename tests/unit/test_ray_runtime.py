"""`init_ray` must keep the dashboard for a local Ray: Train V2 needs its State API to release finished runs'
placement groups, or the second trial of a local `genderid tune` / `genderid demo` waits forever."""
import pytest


def test_local_ray_keeps_the_dashboard(monkeypatch):
    ray = pytest.importorskip("ray")
    calls = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    from genderid.ray_runtime import init_ray

    init_ray()
    assert len(calls) == 1 and calls[0].get("include_dashboard", True) is not False
