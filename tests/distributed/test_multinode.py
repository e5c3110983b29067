"""Several nodes, simulated on this host: the session's head plus a second `ray start --address` node."""
import json
import os
import signal
import time

import pytest

from conftest import free_port, upload_folder
from genderid import shards, storage
from genderid.checkpoint import load_checkpoint
from genderid.config import load_config, named_config_path
from genderid.train_hooks import Hooks, RecordProcess, RecordShards
from genderid.train_ray import run_training

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _children() -> dict[int, int]:
    """pid -> parent pid of every process on the host."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parents[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return parents


def _raylets(cluster) -> dict[int, str]:
    """pid -> node manager port of each raylet of the session's cluster."""
    found = {}
    for pid in cluster.processes():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                args = handle.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if args and args[0].endswith("raylet"):
            port = next((a.split("=", 1)[1] for a in args if a.startswith("--node_manager_port=")), "?")
            found[pid] = port
    return found


@pytest.fixture
def second_node(local_cluster, ray_cluster):
    """One more node (1 CPU) joined to the session's cluster for one test, then stopped by its own processes."""
    before = set(local_cluster.processes())
    port = free_port()
    args = ["start", "--address", local_cluster.address, "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
            "--disable-usage-stats", "--node-manager-port", str(port), "--object-manager-port", str(free_port()),
            "--metrics-export-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
            "--dashboard-agent-grpc-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
            "--min-worker-port", "20000", "--max-worker-port", "20999"]
    local_cluster.ray_cli(*args, timeout=180)
    deadline = time.time() + 60
    while len([n for n in ray_cluster.nodes() if n["Alive"]]) < 2 and time.time() < deadline:
        time.sleep(1)
    assert len([n for n in ray_cluster.nodes() if n["Alive"]]) == 2
    yield str(port)
    own = set(local_cluster.processes()) - before
    parents = _children()
    family = set(own)
    for pid in parents:  # the node's workers are its raylet's descendants
        ancestor = pid
        while ancestor in parents and ancestor not in own:
            ancestor = parents[ancestor]
        if ancestor in own:
            family.add(pid)
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        for pid in family:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while any(os.path.exists(f"/proc/{pid}") for pid in family) and time.time() < deadline:
            time.sleep(0.5)
    deadline = time.time() + 60
    while len([n for n in ray_cluster.nodes() if n["Alive"]]) > 1 and time.time() < deadline:
        time.sleep(1)


def test_one_worker_per_node_disjoint_complete_shards_and_checkpoints_in_shared_storage(
        local_cluster, second_node, prepared, s3_server, tmp_path):
    bucket = s3_server["bucket"]
    source = upload_folder(prepared / "prepared", f"s3://{bucket}/multinode-data")
    record = tmp_path / "record"
    record.mkdir()
    config = load_config(named_config_path("tiny"), [
        f"data.source={source}", f"storage.path=s3://{bucket}/multinode-runs", "storage.name=spread",
        "train.epochs=2", "train.early_stopping_patience=0", "scaling.placement_strategy=STRICT_SPREAD"])
    best = run_training(config, hooks=Hooks(RecordShards(str(record)), RecordProcess(str(record))))

    # A Ray worker process is its node's raylet's child: the recorded parent says which node each rank ran on.
    raylets = _raylets(local_cluster)
    nodes = [raylets.get(json.loads((record / f"process-rank{r}.json").read_text())["ppid"], "?") for r in (0, 1)]
    assert second_node in nodes and len(set(nodes)) == 2, (nodes, raylets)  # one worker on each node
    assert "?" not in nodes

    table = shards.read_table(source)
    train_ids = set(table.filter(table["split"].to_numpy() == 0)["image_id"].to_pylist())
    for epoch in (1, 2):
        per_rank = [json.loads((record / f"epoch{epoch}-rank{r}.json").read_text()) for r in (0, 1)]
        assert set(per_rank[0]).isdisjoint(per_rank[1]) and set(per_rank[0]) | set(per_rank[1]) == train_ids

    run = f"s3://{bucket}/multinode-runs/spread"
    assert best["checkpoint"].startswith(run + "/checkpoint_")
    assert json.loads(storage.read_bytes(run + "/best.json"))["checkpoint"] == best["checkpoint"]
    assert [h["epoch"] for h in json.loads(storage.read_bytes(run + "/history.json"))] == [1, 2]
    assert load_checkpoint(best["checkpoint"]).meta["epoch"] == best["metrics"]["epoch"]
