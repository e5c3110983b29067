"""Shared fixtures. Tiers: unit tests need no Ray; `ray` tests share one local cluster for the whole session."""
from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Ray 2.60 turns token auth on by default: clients of a `ray start` cluster must say so. Ray reads this when it is
# imported, so it is set before any test module imports Ray.
os.environ["RAY_AUTH_MODE"] = "token"
# `ray start` refuses to start without a token, and only `ray.init()` writes one to ~/.ray: on a fresh machine the
# suite's own cluster would never start. The session brings its own token (every Ray process and CLI it starts
# inherits it), so the tests neither depend on nor touch the user's ~/.ray.
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))

REPO = Path(__file__).resolve().parent.parent
REAL_CELEBA = REPO.parent / "shared" / "data" / "celeba-subset"


@pytest.fixture(scope="session")
def synthetic_celeba(tmp_path_factory) -> Path:
    """A small synthetic CelebA folder (240 images, 48x48), made once per session; treat as read-only."""
    from genderid.synth import write_synthetic_celeba

    return write_synthetic_celeba(tmp_path_factory.mktemp("celeba") / "synthetic", n=240, seed=1, size=(48, 48))


def _run_locally(fn, specs):
    return [fn(spec) for spec in specs]


def prepare(folder, out, rows_per_shard=100, run_tasks=_run_locally):
    """``folder`` (a CelebA layout) prepared into ``out`` with the official split, in this process (no Ray)."""
    from genderid import celeba, shards

    index = celeba.read_celeba(str(folder))
    return shards.prepare_dataset(index, celeba.official_split(index), str(out), {"recipe": "official"},
                                  run_tasks=run_tasks, rows_per_shard=rows_per_shard)


@pytest.fixture
def tiny_config():
    from genderid.config import load_config, named_config_path

    return load_config(named_config_path("tiny"))


@pytest.fixture(scope="session")
def real_celeba() -> Path:
    if not (REAL_CELEBA / "list_attr_celeba.txt").is_file():
        pytest.skip(f"real CelebA subset not found at {REAL_CELEBA} (see shared/data/README.md)")
    return REAL_CELEBA


@pytest.fixture(scope="session")
def face_scenes(real_celeba):
    """Photos of real val faces in scenes, by face count (0-3): faces the detector finds on their own crops (CelebA
    also holds profiles, which a frontal detector misses; benchmarks/faces_accuracy.py measures on all faces)."""
    import numpy as np
    from PIL import Image

    from genderid import celeba
    from genderid.faces import TEMPLATE_FRAME, FaceFrontEnd
    from genderid.scenes import compose

    index = celeba.read_celeba(str(real_celeba))
    front, faces = FaceFrontEnd(), []
    for i in np.flatnonzero(celeba.official_split(index) == 1)[:30]:
        face = Image.open(real_celeba / "img_align_celeba" / index.image_ids[i]).convert("RGB")
        if front.faces(face.resize(TEMPLATE_FRAME)):
            faces.append((face, int(index.attributes[i, celeba.MALE])))
    rng = np.random.default_rng(11)
    made = {}
    for count, start in ((0, 0), (1, 0), (2, 1), (3, 3)):
        picked = faces[start:start + count]
        made[count] = compose(rng, [f for f, _ in picked], [m for _, m in picked], face_width=(80, 130), max_angle=5)
    assert [len(made[n].boxes) for n in range(4)] == [0, 1, 2, 3]
    return made


def write_celeba_folder(folder: Path, photos) -> Path:
    """A folder in the official CelebA layout from ``(PIL image, male, split)`` triples (named 000001.jpg, ...)."""
    from genderid import celeba

    (folder / celeba.IMAGE_DIR).mkdir(parents=True)
    rows = []
    for i, (photo, male, split) in enumerate(photos):
        name = f"{i + 1:06d}.jpg"
        photo.save(folder / celeba.IMAGE_DIR / name, quality=95)
        rows.append((name, male, split))
    names = celeba.ATTRIBUTES
    attr = [str(len(rows)), " ".join(names)] + [
        f"{n} " + " ".join("1" if (a == "Male" and m) else "-1" for a in names) for n, m, _ in rows]
    (folder / celeba.ATTR_FILE).write_text("\n".join(attr) + "\n")
    (folder / celeba.PARTITION_FILE).write_text("".join(f"{n} {s}\n" for n, _, s in rows))
    (folder / celeba.IDENTITY_FILE).write_text("".join(f"{n} {k}\n" for k, (n, _, _) in enumerate(rows)))
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 endpoint on loopback (moto's standalone server), wired in through the standard AWS env vars."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError("moto server did not start")
            time.sleep(0.2)
    import boto3

    boto3.client("s3").create_bucket(Bucket="genderid-test")
    yield {"endpoint": endpoint, "bucket": "genderid-test"}
    process.terminate()
    process.wait(timeout=10)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


class LocalCluster:
    """A Ray head node of the test session's own: own temp dir and ports, stopped by its own processes only."""

    def __init__(self, num_cpus: int = 2):
        import tempfile

        # Short path: Ray's unix sockets live under it.
        self.temp_dir = tempfile.mkdtemp(prefix="gid-ray-", dir="/tmp")
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.metrics_port = free_port()  # Ray's Prometheus endpoint for this node (application metrics too)
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.num_cpus = num_cpus

    def env(self) -> dict:
        """Environment for Ray CLI clients: this venv's executables first (jobs run `python`), token auth on."""
        env = dict(os.environ)
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        env["RAY_AUTH_MODE"] = "token"
        env.pop("RAY_ADDRESS", None)
        return env

    def ray_cli(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        ray = os.path.join(os.path.dirname(sys.executable), "ray")
        return subprocess.run([ray, *args], env=self.env(), capture_output=True, text=True, timeout=timeout,
                              check=check)

    def start(self) -> None:
        ports = {"--port": self.port, "--dashboard-port": self.dashboard_port,
                 "--ray-client-server-port": free_port(), "--node-manager-port": free_port(),
                 "--object-manager-port": free_port(), "--metrics-export-port": self.metrics_port,
                 "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
                 "--runtime-env-agent-port": free_port()}
        args = ["start", "--head", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
                "--num-cpus", str(self.num_cpus), "--temp-dir", self.temp_dir, "--disable-usage-stats",
                "--include-dashboard", "true"]
        for flag, port in ports.items():
            args += [flag, str(port)]
        self.ray_cli(*args, timeout=180)

    def processes(self) -> list[int]:
        """PIDs whose command line names this cluster's temp dir (every Ray process of this cluster does)."""
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if self.temp_dir.encode() in handle.read():
                        pids.append(int(entry))
            except OSError:
                continue
        return pids

    def stop(self) -> None:
        import signal

        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            for pid in self.processes():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + wait
            while self.processes() and time.time() < deadline:
                time.sleep(0.5)


@pytest.fixture(scope="session")
def local_cluster(s3_server):
    """The one Ray cluster of the test session (2 CPUs), started like a user would with `ray start --head`.

    The S3 env is set before it starts, so every Ray worker and job sees the moto endpoint.
    """
    cluster = LocalCluster(num_cpus=2)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def ray_cluster(local_cluster):
    """A driver connection from this test process to the session's cluster."""
    import ray

    ray.init(address=local_cluster.address, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def prepared(ray_cluster, tmp_path_factory) -> Path:
    """600 synthetic images (48x48) prepared once per session: ``prepared / "prepared"``; treat as read-only."""
    from genderid.prepare import prepare
    from genderid.synth import write_synthetic_celeba

    root = tmp_path_factory.mktemp("train-data")
    folder = write_synthetic_celeba(root / "celeba", n=600, seed=2, size=(48, 48))
    prepare(str(folder), str(root / "prepared"), rows_per_shard=100)
    return root


def submit_job(cluster: LocalCluster, script: str, *args: str) -> str:
    """`ray job submit` a jobs/ script (tiny config) with the repo as working dir; asserts SUCCEEDED, returns output."""
    import uuid

    submission = f"genderid-{uuid.uuid4().hex[:8]}"
    run = cluster.ray_cli(
        "job", "submit", "--address", cluster.dashboard_url, "--submission-id", submission,
        "--working-dir", str(REPO), "--runtime-env", str(REPO / "jobs" / "runtime_env.yaml"), "--",
        "python", script, "--config", "jobs/configs/tiny.yaml", *args, timeout=900, check=False)
    status = cluster.ray_cli("job", "status", "--address", cluster.dashboard_url, submission)
    assert "succeeded" in status.stdout.lower(), run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def upload_folder(local: Path, uri: str) -> str:
    from genderid import storage

    storage.upload_dir(local, uri)
    return uri


def mlflow_runs(storage_path: Path, kind: str) -> list:
    """The MLflow runs of ``kind`` (train | sweep | trial) in the local tracking store under ``storage_path``."""
    from mlflow.tracking import MlflowClient

    from genderid import tracking

    client = MlflowClient(tracking_uri=f"sqlite:///{storage_path / tracking.STORE_FILE}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(experiments, f"tags.`{tracking.TAG_KIND}` = '{kind}'")
