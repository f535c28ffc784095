"""``segserve segment --engine ray`` on a real two-node Ray cluster started on this machine (one CPU per node).

The Ray engine must give the local engine's bytes and guarantees: same output files, bad inputs reported and
counted, every output complete or absent after a worker or the driver is SIGKILLed, ``--resume`` finishing the
set. On Linux x86_64 Ray installs and starts, so these tests never skip there (an import failure fails them).
"""

from __future__ import annotations

import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

MUST_RUN = sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64")
if MUST_RUN:
    import ray  # noqa: F401  (must import here: a missing extra fails, never skips)
else:
    pytest.importorskip("ray")

OUTPUTS = "labels,overlay,rle,heatmaps"
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[str]:
    """A head and a worker node, one CPU each, on this machine; stopped (with every Ray process) afterwards."""
    port = _free_port()
    # Token authentication, as Ray recommends: the nodes and every driver (segserve's subprocesses inherit it).
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0"}
    saved = {key: os.environ.get(key) for key in token}
    os.environ.update(token)
    env = dict(os.environ)
    common = ["--num-cpus", "1", "--object-store-memory", str(300 * 2**20), "--disable-usage-stats"]
    subprocess.run([RAY, "stop", "--force"], capture_output=True, env=env, timeout=120)
    head = subprocess.run([RAY, "start", "--head", "--port", str(port), "--include-dashboard=false", *common],
                          capture_output=True, text=True, env=env, timeout=180)  # fmt: skip
    assert head.returncode == 0, head.stderr
    address = f"127.0.0.1:{port}"
    try:
        worker = subprocess.run([RAY, "start", "--address", address, *common], capture_output=True, text=True,
                                env=env, timeout=180)  # fmt: skip
        assert worker.returncode == 0, worker.stderr
        deadline, status = time.monotonic() + 120, ""
        while "/2.0 CPU" not in status and time.monotonic() < deadline:  # the GCS reports nodes a little later
            time.sleep(1)
            status = subprocess.run([RAY, "status", "--address", address], capture_output=True, text=True, env=env,
                                    timeout=120).stdout  # fmt: skip
        assert "/2.0 CPU" in status, status
        yield address
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, env=env, timeout=120)
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """40 CamVid-size (360x480) frames with road-like structure, plus two bad files (truncated, not an image)."""
    folder = tmp_path_factory.mktemp("frames")
    rng = np.random.default_rng(22)
    rows = np.arange(360)[:, None, None]
    for index in range(40):
        sky = rows < rng.integers(100, 200)
        pixels = np.where(sky, [135, 170, 220], [90, 85, 95]).astype(np.int16)
        pixels = pixels + rng.integers(-30, 30, size=(360, 480, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        image.save(folder / f"frame{index:02d}.{'png' if index % 3 else 'jpg'}")
    (folder / "frame90.png").write_bytes((folder / "frame01.png").read_bytes()[:300])
    (folder / "frame91.jpg").write_text("not an image")
    return folder


def segment(segserve_command: list[str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*segserve_command, "segment", *args, "--outputs", OUTPUTS, "--no-progress"],
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def local_run(inputs: Path, segserve_command, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("local") / "out"
    result = segment(segserve_command, str(inputs), "-o", str(out), "--batch-size", "4")
    assert result.returncode == 1, result.stderr
    assert "done 40, skipped 0 (already complete), failed 2" in result.stderr
    return files(out)


def test_ray_engine_writes_the_local_engines_bytes(cluster, inputs, local_run, segserve_command, tmp_path) -> None:
    out = tmp_path / "ray"
    result = segment(segserve_command, str(inputs), "-o", str(out), "--engine", "ray", "--address", cluster)
    assert result.returncode == 1, result.stderr
    assert "done 40, skipped 0 (already complete), failed 2" in result.stderr
    assert "frame90.png: " in result.stderr and "frame91.jpg: " in result.stderr  # each with its reason
    assert "frame91.jpg: frame91.jpg is not an image in a format Pillow reads" in result.stderr  # as the local says
    ray_files = files(out)
    assert len(ray_files) == 40 * len(OUTPUTS.split(",")) == len(local_run)
    assert ray_files == local_run  # byte for byte
    again = segment(segserve_command, str(inputs), "-o", str(out), "--engine", "ray", "--address", cluster,
                    "--resume")  # fmt: skip
    assert "done 0, skipped 40 (already complete), failed 2" in again.stderr, again.stderr


def test_from_list_reads_paths_without_walking(cluster, inputs, local_run, segserve_command, tmp_path) -> None:
    listing = tmp_path / "paths.txt"
    chosen = sorted(inputs.glob("frame0*"))[:6]
    listing.write_text("# six frames and one missing\n" + "\n".join(map(str, chosen)) + f"\n{inputs}/gone.png\n")
    out = tmp_path / "out"
    result = segment(segserve_command, "--from-list", str(listing), "-o", str(out), "--engine", "ray", "--address",
                     cluster)  # fmt: skip
    assert result.returncode == 1 and "done 6, skipped 0 (already complete), failed 1" in result.stderr, result.stderr
    assert "gone.png: no such file" in result.stderr
    assert files(out) == {name: data for name, data in local_run.items() if name.split(".")[0] in
                          {p.stem for p in chosen}}  # fmt: skip


def test_filesystem_uri_outputs_match(cluster, inputs, local_run, segserve_command, tmp_path) -> None:
    """An output URI goes through pyarrow.fs (here file://; s3:// and gs:// take the same path, untested here)."""
    out = tmp_path / "uri"
    result = segment(segserve_command, str(inputs), "-o", f"file://{out}", "--engine", "ray", "--address", cluster)
    assert "done 40, skipped 0 (already complete), failed 2" in result.stderr, result.stderr
    assert files(out) == local_run


def _segment_workers() -> list[int]:
    import psutil

    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if "SegmentStage" in " ".join(process.info["cmdline"] or []):
            found.append(process.info["pid"])
    return found


def test_worker_killed_mid_run_then_resume(cluster, inputs, local_run, segserve_command, tmp_path) -> None:
    """SIGKILL the model actor while it writes; whatever the run then does, no partial file exists, and --resume
    completes exactly the uninterrupted set."""
    out = tmp_path / "killed"
    command = [*segserve_command, "segment", str(inputs), "-o", str(out), "--engine", "ray", "--address", cluster,
               "--outputs", OUTPUTS, "--no-progress", "--batch-size", "2"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = []
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline and not killed:
        if len(list(out.glob("*.labels.png"))) >= 4:
            for pid in _segment_workers():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.005)
    _, stderr = process.communicate(timeout=600)
    assert killed, f"no worker to kill; the run ended first: {stderr[-2000:]}"
    done = len(list(out.glob("*.labels.png")))
    assert done >= 4
    partial = [name for name in files(out) if name not in local_run]
    assert not partial, partial  # neither temporaries nor half files
    for name, data in files(out).items():
        assert data == local_run[name], name
    resumed = segment(segserve_command, str(inputs), "-o", str(out), "--engine", "ray", "--address", cluster,
                      "--resume")  # fmt: skip
    assert resumed.returncode == 1, resumed.stderr
    assert files(out) == local_run
    assert not (out / ".segserve-tmp").exists()


def test_driver_killed_mid_run_then_resume(cluster, inputs, local_run, segserve_command, tmp_path) -> None:
    """SIGKILL the driver (the `segserve segment` process) while actors write: Ray ends the job; every output
    already in place is whole, and --resume (after the job's actors are gone) completes exactly the set."""
    out = tmp_path / "driver"
    command = [*segserve_command, "segment", str(inputs), "-o", str(out), "--engine", "ray", "--address", cluster,
               "--outputs", OUTPUTS, "--no-progress", "--batch-size", "2"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline and len(list(out.glob("*.labels.png"))) < 4:
        time.sleep(0.005)
    assert process.poll() is None, "the run ended before it could be killed"
    process.kill()
    process.wait(timeout=60)
    deadline = time.monotonic() + 120
    while _segment_workers() and time.monotonic() < deadline:  # Ray ends a dead driver's actors
        time.sleep(0.5)
    assert not _segment_workers()
    outputs = {name: data for name, data in files(out).items() if not name.startswith(".segserve-tmp/")}
    assert 4 <= len(outputs) < len(local_run)  # an image's outputs appear one by one: some may be missing
    for name, data in outputs.items():
        assert data == local_run[name], name  # complete or absent: never a half file under its final name
    resumed = segment(segserve_command, str(inputs), "-o", str(out), "--engine", "ray", "--address", cluster,
                      "--resume")  # fmt: skip
    assert resumed.returncode == 1, resumed.stderr
    assert files(out) == local_run
    assert not (out / ".segserve-tmp").exists()  # the dead driver's temporary folder is cleared too


def test_bad_requests_exit_2_and_ray_stays_out_of_the_local_engine(inputs, segserve_command, tmp_path) -> None:
    result = segment(segserve_command, str(inputs), "-o", str(tmp_path / "o"), "--actors", "2")
    assert result.returncode == 2 and "--actors only apply with --engine ray" in result.stderr
    result = segment(segserve_command, str(inputs), "-o", "s3://bucket/x")
    assert result.returncode == 2 and "URIs (s3://, gs://, ...) need --engine ray" in result.stderr
    listing = tmp_path / "empty.txt"
    listing.write_text("# nothing\n")
    result = segment(segserve_command, "--from-list", str(listing), "-o", str(tmp_path / "o"), "--engine", "ray")
    assert result.returncode == 2 and "names no inputs" in result.stderr
    result = segment(segserve_command, str(inputs), "-o", str(tmp_path / "o"), "--engine", "ray", "--address",
                     f"127.0.0.1:{_free_port()}")  # fmt: skip
    assert result.returncode == 2 and "cannot reach the Ray cluster at 127.0.0.1:" in result.stderr, result.stderr
    assert not (tmp_path / "o" / ".segserve-tmp").exists()
    probe = "import sys, segserve.cli, segserve.batch, segserve.distributed; print('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "False"
    assert shutil.which(RAY) is not None


def test_local_engine_takes_a_list_too(inputs, local_run, segserve_command, tmp_path) -> None:
    """--from-list without Ray: the same stems and bytes; URIs in the list are refused (exit 2) before any work."""
    listing = tmp_path / "paths.txt"
    chosen = sorted(inputs.glob("frame1*"))
    listing.write_text("\n".join(map(str, chosen)) + "\n")
    out = tmp_path / "out"
    result = segment(segserve_command, "--from-list", str(listing), "-o", str(out))
    assert result.returncode == 0 and f"done {len(chosen)}, " in result.stderr, result.stderr
    assert files(out) == {k: v for k, v in local_run.items() if k.split(".")[0] in {p.stem for p in chosen}}
    listing.write_text(f"{chosen[0]}\ns3://bucket/frame.png\n")
    refused = segment(segserve_command, "--from-list", str(listing), "-o", str(tmp_path / "o2"))
    assert refused.returncode == 2 and "they need --engine ray" in refused.stderr
