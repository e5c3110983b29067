"""Deploying ``serve_config.yaml`` from Python, exactly as ``serve run`` does (used by ``genderid demo``)."""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Optional

import yaml

APP_NAME = "genderid"
# Ships in the package (the repository's serve_config.yaml is a link to it), so an installed wheel has it too.
DEFAULT_SERVE_CONFIG = Path(__file__).resolve().parent / "serve_config.yaml"


def _app(config: dict) -> dict:
    apps = [a for a in config.get("applications", []) if a.get("name") == APP_NAME]
    if len(apps) != 1:
        raise ValueError(f"Serve config: needs exactly one application named {APP_NAME!r}")
    return apps[0]


def load_serve_config(path: str | Path = DEFAULT_SERVE_CONFIG, port: Optional[int] = None) -> dict:
    """``serve_config.yaml`` (validated as ``serve run`` validates it), with the HTTP port replaced if given."""
    from ray.serve.schema import ServeDeploySchema

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Serve config not found")
    config = yaml.safe_load(path.read_text())
    _app(config)
    if port is not None:
        config.setdefault("http_options", {})["port"] = int(port)
    ServeDeploySchema.model_validate(config)
    return config


def set_checkpoint(config: dict, checkpoint: str, report: Optional[str] = None) -> dict:
    """A copy of ``config`` whose genderid application serves ``checkpoint`` (and shows ``report``)."""
    config = copy.deepcopy(config)
    args = _app(config)["args"]
    args["checkpoint"] = str(checkpoint)
    if report is not None:
        args["report"] = str(report)
    return config


def deploy(config: dict) -> None:
    """Start Serve with the config's HTTP options and deploy its applications (``serve run --non-blocking``).

    Needs a connected Ray driver. Mirrors ``ray.serve.scripts.run`` of Ray 2.60, which has no public function.
    """
    from ray.serve._private.api import serve_start
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    client = serve_start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location,
                         grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
                         controller_options=schema.controller_options)
    client.deploy_apps(schema, _blocking=False)


def wait_until_running(app: str = APP_NAME, timeout_s: float = 300) -> None:
    """Block until ``app`` is RUNNING; raise with Serve's message if it fails to deploy or takes too long."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get(app)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(f"Serve application {app!r} failed to deploy: {status.message}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"Serve application {app!r} not RUNNING after {timeout_s:.0f} s "
                               f"(status: {status.status if status else 'not started'})")
        time.sleep(1)
