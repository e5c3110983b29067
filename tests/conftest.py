"""Shared fixtures. Tiers: unit tests need no Ray; `ray` tests share one local cluster for the whole session."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
REAL_CELEBA = REPO.parent / "shared" / "data" / "celeba-subset"


@pytest.fixture(scope="session")
def synthetic_celeba(tmp_path_factory) -> Path:
    """A small synthetic CelebA folder (240 images, 48x48), made once per session; treat as read-only."""
    from genderid.synth import write_synthetic_celeba

    return write_synthetic_celeba(tmp_path_factory.mktemp("celeba") / "synthetic", n=240, seed=1, size=(48, 48))


@pytest.fixture
def tiny_config():
    from genderid.config import load_config, named_config_path

    return load_config(named_config_path("tiny"))


@pytest.fixture(scope="session")
def real_celeba() -> Path:
    if not (REAL_CELEBA / "list_attr_celeba.txt").is_file():
        pytest.skip(f"real CelebA subset not found at {REAL_CELEBA} (see shared/data/README.md)")
    return REAL_CELEBA


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


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """The one local Ray cluster of the test session (2 CPUs). The S3 env is set first so workers inherit it."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {k: os.environ[k] for k in os.environ if k.startswith("AWS_")}})
    yield ray
    ray.shutdown()


def upload_folder(local: Path, uri: str) -> str:
    from genderid import storage

    storage.upload_dir(local, uri)
    return uri
