"""What reaches the console from Ray's forwarded worker output (the pure part of genderid.console)."""
from genderid.console import own_lines


def test_only_our_progress_lines_are_shown_each_once():
    printed = set()
    batch = ["[train] epoch 1/3: train loss 0.5", "(RayTrainWorker pid=1) PreemptionWatcher error",
             "Started training worker group", "  [tune] resuming sweep 'x'  ", "[train] epoch 1/3: train loss 0.5"]
    assert own_lines(batch, printed) == ["[train] epoch 1/3: train loss 0.5", "[tune] resuming sweep 'x'"]
    # The same epoch line forwarded again (Ray prints worker output twice): not shown again.
    assert own_lines(["[train] epoch 1/3: train loss 0.5", "[train] epoch 2/3: train loss 0.4"], printed) == \
        ["[train] epoch 2/3: train loss 0.4"]
