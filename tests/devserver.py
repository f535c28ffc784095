"""A real ``bentoml serve`` of service.py on a free loopback port, for the tests and the benchmarks (no torch).

A development helper, not part of the package: the benchmarks import it as ``tests.devserver``."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent  # the repository: service.py is served from there
SERVICE = "service:Segmentation"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_service(env: Mapping[str, str], log: Path, timeout: float = 120) -> Iterator[tuple[str, subprocess.Popen]]:
    """(base URL, process) of a server that answered ``/readyz``; stopped (terminate, then kill) on exit."""
    port = free_port()
    command = [sys.executable, "-m", "bentoml", "serve", SERVICE, "--port", str(port), "--host", "127.0.0.1"]
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=ROOT, env=dict(env), stdout=output, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"the server exited: {log.read_text()[-3000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not become ready in {timeout:.0f} s")
                time.sleep(0.5)
            yield url, process
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
