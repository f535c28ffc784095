"""The CPU container image, built and run for real: ``deploy/build-image cpu`` through the local Docker daemon, then
``docker run --read-only``: ready, non-root, the same labels as the local runtime, hostile requests still 4xx,
SIGTERM loses no request in flight, and the image's size.

Where Docker can run: on a Linux host with root this test installs Debian's docker.io (and debootstrap) if
missing and starts ``dockerd`` if none is running. With no registry reachable the base is built from Debian's
packages (``SEGSERVE_BASE_IMAGE=debootstrap``). Elsewhere (no root, no Docker) it is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from devserver import free_port
from PIL import Image

from segserve.runtime import Segmenter
from segserve.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
CAMVID_VAL = ROOT.parent / "shared" / "data" / "camvid" / "val"
TAG = "segserve-cpu:test"


def _docker_answers() -> bool:
    return shutil.which("docker") is not None and subprocess.run(["docker", "info"], capture_output=True,
                                                                  timeout=30).returncode == 0  # fmt: skip


@pytest.fixture(scope="module")
def docker(tmp_path_factory) -> Iterator[None]:
    """A running Docker daemon (started here, and stopped afterwards, if there was none)."""
    started = None
    if not _docker_answers():
        if sys.platform != "linux" or os.geteuid() != 0:
            pytest.skip("no Docker daemon, and starting one needs root on Linux")
        if shutil.which("dockerd") is None or shutil.which("debootstrap") is None:
            for command in (
                ["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "docker.io", "debootstrap"],
            ):
                subprocess.run(command, check=True, capture_output=True, timeout=900,
                               env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})  # fmt: skip
        log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
        started = subprocess.Popen(["dockerd"], stdout=log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not _docker_answers():
            assert started.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
    yield
    if started is not None:
        started.terminate()
        started.wait(60)


@pytest.fixture(scope="module")
def image(docker) -> dict:
    """Build the CPU image (debootstrap base where no registry answers); its size and build time."""
    base = "python:3.11-slim"
    pulled = subprocess.run(["docker", "pull", base], capture_output=True, timeout=120).returncode == 0
    env = {**os.environ, "SEGSERVE_PYTHON": sys.executable}
    if not pulled:
        env["SEGSERVE_BASE_IMAGE"] = "debootstrap"
    if Path("/etc/ssl/certs/ca-certificates.crt").exists():
        env["SEGSERVE_TRUST_HOST_CA"] = "1"  # networks that re-sign TLS (this one does)
    started = time.perf_counter()
    build = subprocess.run([str(ROOT / "deploy" / "build-image"), "cpu", TAG], env=env, capture_output=True,
                           text=True, timeout=1800)  # fmt: skip
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    inspected = json.loads(subprocess.run(["docker", "image", "inspect", TAG], capture_output=True, text=True,
                                          check=True).stdout)[0]  # fmt: skip
    print(f"\n{build.stdout.strip().splitlines()[-1]} in {time.perf_counter() - started:.0f} s")
    return inspected


@contextlib.contextmanager
def container(*extra: str) -> Iterator[tuple[str, str]]:
    """(base URL, container id) of the image running read-only, once /readyz answers."""
    port = free_port()
    command = ["docker", "run", "-d", "--read-only", "--tmpfs", "/tmp", "-p", f"127.0.0.1:{port}:3000",
               "-e", "SEGSERVE_THREADS=2", *extra, TAG]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, check=True)
    identifier = run.stdout.strip()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            state = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", identifier], capture_output=True,
                                   text=True).stdout.strip()  # fmt: skip
            logs = subprocess.run(["docker", "logs", identifier], capture_output=True, text=True)
            assert state == "true" and time.monotonic() < deadline, logs.stdout[-2000:] + logs.stderr[-2000:]
            time.sleep(1)
        yield url, identifier
    finally:
        subprocess.run(["docker", "rm", "-f", identifier], capture_output=True)


def frame() -> bytes:
    frames = sorted(CAMVID_VAL.glob("*.png"))
    if frames:
        return frames[len(frames) // 2].read_bytes()
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (360, 480, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_the_image_is_small_hardened_and_labelled(image: dict) -> None:
    config = image["Config"]
    assert image["Size"] < 1e9, f"{image['Size'] / 1e9:.2f} GB"
    assert config["User"] == "bentoml"
    assert "http://127.0.0.1:3000/livez" in " ".join(config["Healthcheck"]["Test"])
    labels = config["Labels"]
    assert (
        labels["segserve.version"]
        and labels["segserve.model"].endswith(".onnx")
        and labels["segserve.variant"] == "cpu"
    )
    history = subprocess.run(["docker", "history", "--no-trunc", TAG], capture_output=True, text=True).stdout
    assert "API_KEY" not in history and "torch" not in history.lower()


def test_the_container_answers_as_the_local_runtime(image: dict) -> None:
    with container() as (url, identifier), httpx.Client(base_url=url, timeout=120) as client:
        assert subprocess.run(["docker", "exec", identifier, "id", "-u"], capture_output=True,
                              text=True).stdout.strip() == "1034"  # fmt: skip
        assert subprocess.run(
            ["docker", "exec", identifier, "touch", "/home/bentoml/x"], capture_output=True
        ).returncode
        engine = client.get("/metadata").json()["engine"]
        data = frame()
        answer = client.post("/segment", content=data, headers={"content-type": "image/png"})
        assert answer.status_code == 200, answer.text
        # the engine and precision the container measured and chose, here (the suite pins onnxruntime otherwise)
        local = Segmenter(engine=engine["engine"], precision=engine["precision"], threads=2,
                          settings=Settings.from_env({}))  # fmt: skip
        expected = local.segment(data).labels
        served = np.asarray(Image.open(io.BytesIO(answer.content)))
        assert (served == expected).mean() >= 0.999, (engine, (served == expected).mean())
        broken = {"content": b"hello", "headers": {"content-type": "multipart/form-data; boundary=x"}}
        for request, status in (({"files": {"image": (None, "http://127.0.0.1:1/x")}}, 400), (broken, 400),
                                ({"json": {"image": "x"}}, 415)):  # fmt: skip
            refused = client.post("/segment", **request)
            assert refused.status_code == status and set(refused.json()) == {"error"}
        assert client.get("/segment").status_code == 405


def test_sigterm_finishes_the_request_in_flight(image: dict) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (2400, 3200, 3), dtype=np.uint8)).save(buffer, "PNG")
    with container() as (url, identifier):
        outcome: dict = {}

        def request() -> None:
            try:
                response = httpx.post(f"{url}/segment", content=buffer.getvalue(), timeout=120,
                                      headers={"content-type": "image/png"})  # fmt: skip
                outcome["status"] = response.status_code
            except httpx.HTTPError as error:
                outcome["status"] = repr(error)

        worker = threading.Thread(target=request)
        worker.start()
        time.sleep(1.5)  # uploaded and being segmented
        subprocess.run(["docker", "kill", "--signal", "TERM", identifier], check=True, capture_output=True)
        exit_code = subprocess.run(["docker", "wait", identifier], capture_output=True, text=True, timeout=150)
        worker.join(150)
        logs = subprocess.run(["docker", "logs", identifier], capture_output=True, text=True)
        assert outcome["status"] == 200, logs.stdout[-3000:] + logs.stderr[-3000:]
        assert exit_code.stdout.strip() == "0"
