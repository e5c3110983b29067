"""The try-it page (GET /) in a real headless Chromium, on a live `serve run` behind a route prefix.

Debian's `chromium`, driven through Playwright's Python API with ``executable_path`` (nothing is downloaded:
never `playwright install`). `.ci/run` installs the browser; elsewhere, without one, this test says so and skips.
"""
import os
import re
import shutil
from urllib.parse import urlparse

import pytest
import requests
import torch
import yaml

from conftest import REPO, free_port
from genderid.calibration import Calibration
from genderid.checkpoint import save_checkpoint
from genderid.model import GenderNet
from genderid.preprocess import Preprocessing

pytestmark = [pytest.mark.ray, pytest.mark.real]
PREFIX = "/try/genderid"  # not "/": the page must work behind any route prefix


def chromium() -> str:
    """The browser's path, or a skip (a failure in CI, which must run this test)."""
    path = os.environ.get("GENDERID_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    problem = None
    if path is None:
        problem = "no Chromium found (Debian: apt-get install chromium; or set GENDERID_CHROMIUM)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "the playwright package is missing (pip install -e '.[dev]')"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test must run in CI: {problem}")
        pytest.skip(f"browser test skipped: {problem}")
    return path


def save_for_readme(screenshot, photo_boxes, out) -> None:
    """The README's copy of the screenshot: the CelebA faces in it (inside their boxes, and the crops) pixelated, so
    CelebA's images stay out of the repository; a small palette PNG."""
    from PIL import Image

    image = Image.open(screenshot).convert("RGB")
    for box in photo_boxes:
        inset = 4  # keep the drawn box's border
        area = tuple(round(v) for v in (box["x"] + inset, box["y"] + inset, box["x"] + box["width"] - inset,
                                        box["y"] + box["height"] - inset))
        region = image.crop(area)
        small = region.resize((max(1, region.width // 10), max(1, region.height // 10)), Image.Resampling.BOX)
        image.paste(small.resize(region.size, Image.Resampling.NEAREST), area[:2])
    image.quantize(colors=64).save(out, optimize=True)


@pytest.fixture(scope="module")
def page_endpoint(local_cluster, ray_cluster, tmp_path_factory):
    """`serve run` of serve_config.yaml under a route prefix, with an untrained tiny model (the page shows what
    the endpoint answers, whatever the model)."""
    from test_serve import serve_cli, wait_for, ok

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("web")
    # GENDERID_WEB_CHECKPOINT: serve a trained model instead (how the README's screenshot was made).
    checkpoint = os.environ.get("GENDERID_WEB_CHECKPOINT") or save_checkpoint(
        folder / "checkpoint", GenderNet(width=0.1, batch_norm=True, head_hidden=16).eval(),
        preprocessing=Preprocessing(image_size=(64, 52)),
        calibration=Calibration(temperature=1.5, confidence_threshold=0.6, target_accuracy=0.99, fitted_on="val"))
    port = free_port()
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    config["http_options"]["port"] = port
    application = config["applications"][0]
    application["route_prefix"] = PREFIX
    application["args"]["checkpoint"] = str(checkpoint)
    path = folder / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    run = serve_cli(local_cluster, "run", str(path), "--address", local_cluster.address, "--non-blocking")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    url = f"http://127.0.0.1:{port}{PREFIX}"
    wait_for(lambda: ok(url + "/healthz"), 240, "the endpoint's /healthz")
    yield url
    from ray import serve

    serve.shutdown()


def test_the_page_is_small_self_contained_and_sent_with_a_strict_policy(page_endpoint):
    page = requests.get(page_endpoint, timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert f'<base href="{PREFIX}/">' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    total = len(page.content)
    for name in ("app.js", "style.css"):
        answer = requests.get(f"{page_endpoint}/static/{name}", timeout=10)
        assert answer.status_code == 200
        total += len(answer.content)
    assert total < 60_000
    assert "http://" not in page.text.replace("http-equiv", "") and "https://" not in page.text
    assert requests.get(f"{page_endpoint}/static/..%2Fserve_app.py", timeout=10).status_code == 404
    assert requests.get(f"{page_endpoint}/static/model.py", timeout=10).status_code == 404


def test_a_photo_with_two_faces_is_drawn_as_the_endpoint_answers_and_errors_show_its_message(
        page_endpoint, face_scenes, tmp_path):
    from playwright.sync_api import sync_playwright

    executable = chromium()
    photo = tmp_path / "two-friends.jpg"
    face_scenes[2].photo.save(photo, quality=92)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo")
    expected = requests.post(page_endpoint + "/faces", data=photo.read_bytes(),
                             headers={"Content-Type": "image/jpeg"}, timeout=60).json()
    assert len(expected["faces"]) == 2
    refused = requests.post(page_endpoint + "/faces", data=notes.read_bytes(), headers={"Content-Type": "text/plain"},
                            timeout=60)
    assert refused.status_code == 415
    host = urlparse(page_endpoint).netloc
    requested, console_errors = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.on("request", lambda request: requested.append(request.url))
            page.on("console", lambda message: message.type == "error" and console_errors.append(message.text))
            page.on("pageerror", lambda error: console_errors.append(str(error)))
            page.goto(page_endpoint)  # no trailing slash: the route prefix itself
            page.wait_for_selector("#metadata dd >> text=" + expected["faces"][0]["model_version"])
            # A labelled control, reachable by its label (and so by keyboard and screen reader).
            page.get_by_label("Choose photos").set_input_files(str(photo))
            page.wait_for_selector(".card .summary >> text=2 faces found")
            boxes = page.locator(".face-box")
            assert boxes.count() == 2
            labels = page.locator(".faces .label").all_inner_texts()
            assert labels == [f"{i + 1}. {face['label']}" for i, face in enumerate(expected["faces"])]
            width, height = expected["image_size"]
            for index, face in enumerate(expected["faces"]):
                x0, y0, x1, y1 = face["box"]
                drawn = {k: float(v) for k, v in re.findall(r"(left|top|width|height): ([0-9.]+)%",
                                                               boxes.nth(index).get_attribute("style"))}
                assert drawn == pytest.approx({"left": 100 * x0 / width, "top": 100 * y0 / height,
                                               "width": 100 * (x1 - x0) / width, "height": 100 * (y1 - y0) / height},
                                              abs=0.01)
                assert boxes.nth(index).get_attribute("data-label") == face["label"]
            badges = page.locator(".faces li .badge").count()
            assert badges == sum(face["uncertain"] for face in expected["faces"])
            assert page.locator(".faces img").count() == 2  # the aligned crops the model saw
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            if os.environ.get("GENDERID_SCREENSHOT"):  # how the README's screenshot is made
                faces = page.locator(".face-box, .faces img")
                photos = [faces.nth(i).bounding_box() for i in range(faces.count())]
                save_for_readme(tmp_path / "page.png", photos, os.environ["GENDERID_SCREENSHOT"])
            assert console_errors == []
            # A text file: the endpoint's own 415 message, shown on the page. (Chromium logs the refused request
            # itself as a console error; that one is expected.)
            page.get_by_label("Choose photos").set_input_files(str(notes))
            error = page.wait_for_selector(".card .summary.error")
            assert error.inner_text() == f"415: {refused.json()['error']}"
            # A phone-width screen: nothing wider than the viewport.
            page.set_viewport_size({"width": 390, "height": 844})
            assert page.evaluate("document.documentElement.scrollWidth") <= 391
        finally:
            browser.close()
    network = [url for url in requested if not url.startswith(("blob:", "data:"))]
    assert network and all(urlparse(url).netloc == host for url in network), network
    assert [e for e in console_errors if "status of 415" not in e] == []
