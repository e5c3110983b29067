"""The package as users install it: a built wheel (not editable) in a new virtualenv, run from a folder that is not
the repository. Named configs, the default serve config and the try-it page must come from the wheel itself.

The new virtualenv finds the dependencies (torch, Ray, ...) in this one's site-packages through a ``.pth`` line
(not processed as a site dir, so this checkout's editable install stays invisible there): installing them again
would take minutes and test pip, not this package. The demo joins the session's cluster, whose workers import
genderid from this checkout, as a cluster's workers import whatever is installed on them.
"""
import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import REPO, free_port

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    # Built from a copy of the sources: a build writes build/ and *.egg-info next to them.
    source = root / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache", "docs"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                            "-w", str(root / "dist"), "-q"], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = list((root / "dist").glob("genderid-*.whl"))
    venv = root / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True, timeout=120)
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(subprocess.run([str(venv / "bin/python"), "-c", where], capture_output=True, text=True,
                               check=True).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "--no-deps", "-q", str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    work = root / "elsewhere"
    work.mkdir()
    return {"venv": venv, "work": work, "site": site}


def genderid(installed, *args, env=None, timeout=300):
    return subprocess.run([str(installed["venv"] / "bin/genderid"), *args], cwd=installed["work"], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_the_installed_package_is_the_wheel_and_ships_its_configs_and_page(installed):
    where = subprocess.run([str(installed["venv"] / "bin/python"), "-c", "import genderid; print(genderid.__file__)"],
                           cwd=installed["work"], capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(installed["site"]))  # not this checkout
    assert genderid(installed, "--help").returncode == 0
    shown = genderid(installed, "config", "show", "cpu")
    assert shown.returncode == 0 and shown.stdout == (REPO / "genderid/configs/cpu.yaml").read_text()
    written = genderid(installed, "serve-config", "--out", "serve.yaml")
    assert written.returncode == 0
    assert (installed["work"] / "serve.yaml").read_text() == (REPO / "serve_config.yaml").read_text()
    for name in ("web/index.html", "web/app.js", "web/style.css"):
        assert (installed["site"] / "genderid" / name).is_file()


def test_the_demo_runs_from_the_wheel_with_a_named_config(installed, local_cluster, ray_cluster):
    port = free_port()
    env = {**local_cluster.env(), "RAY_ADDRESS": local_cluster.address, "PYTHONUNBUFFERED": "1"}
    run = genderid(installed, "demo", "--workdir", "demo", "--n", "300", "--port", str(port), "--config", "tiny",
                   "tune.num_samples=1", "tune.max_epochs=1", "tune.unfreeze_depth=[5]", "train.epochs=1",
                   env=env, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [summary] = list((installed["work"] / "demo").glob("*/summary.json"))
    assert len(json.loads(summary.read_text())["predictions"]) == 4  # served from the wheel's serve_config.yaml
