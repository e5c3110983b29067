"""Deploying ``serve_config.yaml`` from Python, exactly as ``serve run`` does (used by ``genderid demo``)."""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Optional

import yaml

APP_NAME = "genderid"
DEFAULT_SERVE_CONFIG = Path(__file__).resolve().parent.parent / "serve_config.yaml"


def load_serve_config(path: str | Path = DEFAULT_SERVE_CONFIG, checkpoint: Optional[str] = None,
                      port: Optional[int] = None, report: Optional[str] = None) -> dict:
    """``serve_config.yaml`` with the genderid application's checkpoint (and the HTTP port) replaced."""
    from ray.serve.schema import ServeDeploySchema

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Serve config not found")
    config = copy.deepcopy(yaml.safe_load(path.read_text()))
    apps = [a for a in config.get("applications", []) if a.get("name") == APP_NAME]
    if len(apps) != 1:
        raise ValueError(f"{path}: needs exactly one application named {APP_NAME!r}")
    if checkpoint is not None:
        apps[0]["args"]["checkpoint"] = str(checkpoint)
    if report is not None:
        apps[0]["args"]["report"] = str(report)
    if port is not None:
        config.setdefault("http_options", {})["port"] = int(port)
    ServeDeploySchema.model_validate(config)  # the same validation `serve run` applies
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
