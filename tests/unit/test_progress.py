"""Progress bars: drawn where a person watches, each long step's bar runs to its end (genderid.progress)."""
import io

from genderid import console, progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_bars_are_drawn_in_a_terminal_and_left_out_of_pipes_unless_asked(monkeypatch):
    monkeypatch.delenv(progress.PROGRESS_ENV, raising=False)
    assert progress.enabled(Terminal()) and not progress.enabled(io.StringIO())
    monkeypatch.setenv(progress.PROGRESS_ENV, "1")
    assert progress.enabled(io.StringIO())
    monkeypatch.setenv(progress.PROGRESS_ENV, "0")
    assert not progress.enabled(Terminal())

    pipe = io.StringIO()
    assert list(progress.track(range(3), 3, "evaluate test", "batches", stream=pipe)) == [0, 1, 2]
    assert pipe.getvalue() == ""  # off: the items pass through, nothing is drawn
    monkeypatch.delenv(progress.PROGRESS_ENV)
    terminal = Terminal()
    assert list(progress.track(range(3), 3, "evaluate test", "batches", stream=terminal)) == [0, 1, 2]
    last = terminal.getvalue().rstrip("\n").split("\r")[-1]
    assert last.startswith("evaluate test: 100%") and "3/3 batches" in last


def test_a_workers_bar_is_drawn_without_rays_prefix_and_ends_at_what_the_rank_did(monkeypatch, capsys):
    monkeypatch.setenv(progress.PROGRESS_ENV, "1")
    bars = {}
    state = {"__magic_token__": "x", "uuid": "u1", "desc": "epoch 1/3", "unit": "batches", "total": 8, "x": 0,
             "pos": 0, "pid": 123, "ip": "127.0.0.1", "closed": False}
    console.draw_worker_bar(state, bars)
    console.draw_worker_bar({**state, "x": 5}, bars)
    assert bars["u1"].n == 5 and bars["u1"].total == 8
    console.draw_worker_bar({**state, "x": 15}, bars)  # the rank got more than its fair share of blocks
    assert bars["u1"].total == 15
    console.draw_worker_bar({**state, "x": 15, "total": 15, "closed": True}, bars)
    assert bars == {}
    drawn = capsys.readouterr().err
    last = drawn.rstrip("\n").split("\r")[-1]
    assert last.startswith("epoch 1/3: 100%") and "15/15 batches" in last and "pid" not in drawn
