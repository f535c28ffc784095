"""The web page at / in a real headless Chromium (Debian's package, driven by Playwright) against a real
``bentoml serve``: upload a road frame, see the overlay and legend, read a pixel's class, show a heatmap, get the
API's own message for a junk file. A screenshot of each state goes to build/artifacts/page/.

Chromium: Debian's ``chromium`` (Playwright's own browser download is not reachable here); on a Linux host with
root it is installed if missing (as CI does), elsewhere the test is skipped with the reason.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from devserver import running_service
from PIL import Image

from segserve.runtime import Segmenter

ROOT = Path(__file__).resolve().parent.parent
CAMVID_VAL = ROOT.parent / "shared" / "data" / "camvid" / "val"
ARTIFACTS = ROOT / "build" / "artifacts" / "page"


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("no chromium here, and installing Debian's needs root on Linux")
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        subprocess.run(command, check=True, capture_output=True, timeout=900,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})  # fmt: skip
    return shutil.which("chromium") or pytest.fail("chromium was installed but is not on PATH")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    executable = _chromium()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def url(tmp_path_factory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("bentoml-home")
    env = {**os.environ, "BENTOML_HOME": str(home), "SEGSERVE_THREADS": "2"}
    env.pop("SEGSERVE_MODEL", None)
    with running_service(env, home / "serve.log") as (address, _):
        yield address


def _frame(tmp_path: Path) -> tuple[Path, np.ndarray]:
    frames = sorted(CAMVID_VAL.glob("*.png"))
    if frames:
        path = frames[len(frames) // 3]
        return path, np.asarray(Image.open(path).convert("RGB"))
    rows = np.linspace(0, 1, 360)[:, None, None]
    scene = np.where(rows < 0.35, [140, 160, 190], np.where(rows < 0.6, [110, 70, 60], [100, 95, 105]))
    pixels = np.broadcast_to(scene, (360, 480, 3)).astype(np.uint8)
    path = tmp_path / "scene.png"
    Image.fromarray(pixels).save(path)
    return path, pixels


def test_the_page_segments_explores_and_reports_errors(browser, url: str, tmp_path: Path) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    card = httpx.get(f"{url}/metadata", timeout=60).json()
    frame, pixels = _frame(tmp_path)
    labels = Segmenter(threads=2).segment(pixels).labels
    page = browser.new_page(viewport={"width": 1280, "height": 900}, bypass_csp=True)  # for the test's own probes
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("request", lambda request: problems.append(request.url) if not request.url.startswith(url) else None)

    page.goto(f"{url}/")
    page.wait_for_selector("#legend tbody tr")
    assert page.locator("#legend tbody tr").count() == len(card["classes"])
    assert page.locator("#legend tbody").inner_text().split("\n")[0].strip() == card["classes"][0]
    assert card["backbone"] in page.locator("#card").inner_text()
    page.screenshot(path=str(ARTIFACTS / "1-empty.png"))

    page.set_input_files("#file", str(frame))
    page.wait_for_selector("#result:not([hidden])", timeout=120_000)
    page.wait_for_function("!document.getElementById('status').classList.contains('busy')", timeout=120_000)
    assert page.locator("#error").is_hidden()
    shares = page.locator("#legend tbody td.num").all_inner_texts()
    assert any(text.endswith("%") for text in shares)  # /analyze's classes present, with their shares
    page.screenshot(path=str(ARTIFACTS / "2-overlay.png"), full_page=True)

    target = card["classes"].index("road") if "road" in card["classes"] else int(labels[-20, labels.shape[1] // 2])
    ys, xs = np.nonzero(labels == target)
    pick = np.argsort(ys)[int(0.75 * len(ys))]  # a pixel of that class in the lower part of the frame
    y, x = int(ys[pick]), int(xs[pick])
    page.locator("#photo").scroll_into_view_if_needed()
    box = page.locator("#photo").bounding_box()
    page.mouse.move(box["x"] + (x + 0.5) * box["width"] / labels.shape[1],
                    box["y"] + (y + 0.5) * box["height"] / labels.shape[0])  # fmt: skip
    page.wait_for_function("document.getElementById('probe').dataset.className !== undefined")
    probe = page.locator("#probe")
    assert probe.get_attribute("data-class-name") == card["classes"][target], probe.inner_text()
    assert probe.inner_text().count("%") == 3  # the top-3 probabilities there
    page.screenshot(path=str(ARTIFACTS / "3-probe.png"))

    page.locator("#legend tbody tr").nth(target).locator("button").click()
    page.wait_for_selector("#heat:not([hidden])")
    alpha = page.evaluate(f"document.getElementById('heat').getContext('2d').getImageData({x}, {y}, 1, 1).data[3]")
    assert alpha > 0 and page.locator("#heat-scale").is_visible()
    assert page.locator("#dl-heatmaps").get_attribute("href").startswith("blob:")
    page.screenshot(path=str(ARTIFACTS / "4-heatmap.png"), full_page=True)

    junk = tmp_path / "notes.png"
    junk.write_bytes(b"these are not the pixels you are looking for" * 20)
    expected = httpx.post(f"{url}/segment", files={"image": ("notes.png", junk.read_bytes())}, timeout=60).json()
    page.set_input_files("#file", str(junk))
    page.wait_for_selector("#error:not([hidden])", timeout=60_000)
    assert page.locator("#error").inner_text() == expected["error"]
    page.screenshot(path=str(ARTIFACTS / "5-error.png"))

    phone = browser.new_page(viewport={"width": 390, "height": 844}, bypass_csp=True)
    phone.goto(f"{url}/")
    phone.wait_for_selector("#legend tbody tr")
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling on a phone
    phone.screenshot(path=str(ARTIFACTS / "6-phone.png"), full_page=True)
    # the junk upload's 4xx answers are the only resources that may fail; nothing went to another host
    assert not [p for p in problems if "status of 400" not in p], problems


def test_the_api_page_renders_under_its_policy(browser, url: str) -> None:
    page = browser.new_page(viewport={"width": 1200, "height": 900})  # the Content-Security-Policy enforced
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.goto(f"{url}/docs")
    page.wait_for_selector(".opblock", timeout=60_000)
    assert page.locator(".opblock").count() >= 7 and "/segment" in page.locator("#swagger-ui").inner_text()
    page.screenshot(path=str(ARTIFACTS / "7-api.png"))
    assert not errors, errors  # nothing blocked: nothing asked from another host


def test_the_pages_ship_with_the_package_and_load_nothing_from_outside(url: str) -> None:
    for path in ("/", "/docs", "/static/app.js", "/static/app.css", "/static/docs.js"):
        answer = httpx.get(f"{url}{path}", timeout=30)
        assert answer.status_code == 200, path
        assert "default-src 'self'" in answer.headers["content-security-policy"]
        assert not any(host in answer.text for host in ("googletagmanager", "github.com", "cdn", "fonts.g")), path
    page = io.StringIO(httpx.get(f"{url}/", timeout=30).text)
    assert '<script src="static/app.js"></script>' in page.getvalue()
