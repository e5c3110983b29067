"""`init_ray` must keep the dashboard for a local Ray: Train V2 needs its State API to release finished runs'
placement groups, or the second trial of a local `genderid tune` / `genderid demo` waits forever. Around Ray's
fit(), the caller keeps its own signal handlers (the Ray tests check them after real runs)."""
import signal
import threading

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


def test_the_callers_signal_handlers_come_back_after_what_fit_installs():
    from genderid.ray_runtime import caller_signal_handlers

    def own(signum, frame):
        pass

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGUSR1)}
    try:
        signal.signal(signal.SIGINT, own)
        with pytest.raises(RuntimeError):  # a failed fit() too
            with caller_signal_handlers():
                signal.signal(signal.SIGINT, lambda *_: None)  # what Ray Train / Tune leave behind
                signal.signal(signal.SIGUSR1, lambda *_: None)
                raise RuntimeError("fit failed")
        assert signal.getsignal(signal.SIGINT) is own
        assert signal.getsignal(signal.SIGUSR1) is before[signal.SIGUSR1]
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_outside_the_main_thread_the_handlers_are_left_alone():
    """Only the main thread may set handlers (Tune runs a trial's fit() in a thread of its actor)."""
    from genderid.ray_runtime import caller_signal_handlers

    errors = []

    def trial():
        try:
            with caller_signal_handlers():
                pass
        except Exception as exc:  # signal.signal outside the main thread raises ValueError
            errors.append(exc)

    thread = threading.Thread(target=trial)
    thread.start()
    thread.join()
    assert errors == []
