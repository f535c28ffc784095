"""Issue 5 and 6 figures: the batch command and the HTTP service against the bare runtime, and the memory of
segmenting a 12000x12000 image."""

from __future__ import annotations

import contextlib
import io
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from benchmarks.common import Section, default_model, road_images
from benchmarks.speed import our_session
from segserve.settings import Settings


def _cli() -> list[str]:
    return [str(Path(sys.executable).parent / "segserve")]


def batch_vs_session(scratch: Path, quick: bool) -> Section:
    """The batch command's images/s against bare ``InferenceSession.run`` on the same, already decoded, images."""
    folder = scratch / "batch-in"
    folder.mkdir(exist_ok=True)
    images = road_images(24 if quick else 60)
    for index, pixels in enumerate(images):
        Image.fromarray(pixels).save(folder / f"{index:03d}.png")
    session = our_session(default_model())
    session.run(["labels"], {"images": images[0][None]})
    bare, command = [], []
    for round_ in range(2 if quick else 3):
        started = time.perf_counter()
        for pixels in images:
            session.run(["labels"], {"images": pixels[None]})
        bare.append(len(images) / (time.perf_counter() - started))
        out = scratch / f"batch-out-{round_}"
        result = subprocess.run([*_cli(), "segment", str(folder), "-o", str(out), "--no-progress"],
                                capture_output=True, text=True, check=True)  # fmt: skip
        command.append(float(re.search(r"\(([\d.]+) images/s\)", result.stderr).group(1)))
    section = Section("Batch command vs bare session (shipped model, CamVid 360x480 PNGs, labels output)",
                      ["measure", "images/s"])  # fmt: skip
    ratio = statistics.median(command) / statistics.median(bare)
    section.rows += [["bare `InferenceSession.run` on decoded arrays", statistics.median(bare)],
                     ["`segserve segment DIR -o OUT` (decode + infer + PNG encode + atomic write)",
                      statistics.median(command)],
                     ["ratio (target >= 0.9)", f"{ratio:.2f}"]]  # fmt: skip
    section.notes.append("Rounds alternate bare and command; the command's rate excludes its model load.")
    return section


def large_image_memory(scratch: Path) -> Section:
    """Peak RSS of ``segserve segment`` on one 12000x12000 JPEG (tiled), measured by the kernel (wait4)."""
    path = scratch / "large.jpg"
    Image.fromarray(road_images(1)[0]).resize((12000, 12000), Image.BILINEAR).save(path, quality=90)
    started = time.perf_counter()
    process = subprocess.Popen([*_cli(), "segment", str(path), "-o", str(scratch / "large-out"), "--no-progress",
                                "--outputs", "labels"], stderr=subprocess.PIPE)  # fmt: skip
    peak = 0  # the child's own high-water mark (VmHWM); rusage of a forked child would count this process's pages
    while process.poll() is None:
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{process.pid}/status").read_text()
            found = re.search(r"VmHWM:\s+(\d+) kB", status)  # absent once the process is a zombie
            peak = max(peak, int(found.group(1)) * 1024) if found else peak
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    stderr = process.stderr.read().decode() if process.stderr else ""
    if process.returncode != 0:
        raise RuntimeError(f"segserve segment failed on the large image: {stderr[-500:]}")
    with Image.open(scratch / "large-out" / "large.labels.png") as labels:
        size = labels.size
    section = Section("Large image memory (12000x12000 JPEG, tiles 1024 / overlap 256)",
                      ["measure", "value"])  # fmt: skip
    section.rows += [["peak resident memory (target < 3 GB)", f"{peak / 1e9:.2f} GB"],
                     ["wall time (decode, 12000x12000 tiled inference, PNG encode)", f"{seconds:.1f} s"],
                     ["label map written", f"{size[0]}x{size[1]}"]]  # fmt: skip
    return section


def service_vs_runtime(scratch: Path, quick: bool, clients: int = 16) -> Section:
    """``/segment`` over loopback HTTP against the bare runtime doing the same work (decode, segment, encode), both
    on the default engine (one engine-choice cache, so server and benchmark run the same candidate)."""
    import httpx

    from segserve.runtime import Segmenter, encode
    from tests.devserver import running_service

    cache = scratch / "engine-cache"
    env = {**os.environ, "BENTOML_HOME": str(scratch / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
           "SEGSERVE_CACHE_DIR": str(cache)}  # fmt: skip
    segmenter = Segmenter(settings=Settings.from_env({"SEGSERVE_CACHE_DIR": str(cache)}))  # measured first, cached
    with running_service(env, scratch / "serve.log") as (url, _):
        buffer = io.BytesIO()
        Image.fromarray(road_images(1, (512, 512))[0]).save(buffer, format="PNG")
        body = buffer.getvalue()

        def bare() -> None:
            encode.label_png(segmenter.segment(body).labels, segmenter.metadata.palette)

        client = httpx.Client(base_url=url, timeout=60)

        def http() -> None:
            response = client.post("/segment", files={"image": ("x.png", body, "image/png")})
            response.raise_for_status()

        count = 20 if quick else 50
        bare_times, http_times = [], []
        for _ in range(3):  # warm-up
            bare(), http()
        for _ in range(count):  # alternate one by one
            for fn, bucket in ((bare, bare_times), (http, http_times)):
                started = time.perf_counter()
                fn()
                bucket.append(time.perf_counter() - started)
        bare_p50, http_p50 = statistics.median(bare_times), statistics.median(http_times)

        requests = 48 if quick else 120
        local, connections = threading.local(), []

        def one(_: int) -> None:  # one keep-alive connection per client thread, as any real client holds
            if not hasattr(local, "client"):
                local.client = httpx.Client(base_url=url, timeout=60)
                connections.append(local.client)
            local.client.post("/segment", files={"image": ("x.png", body, "image/png")}).raise_for_status()

        bare_rates, http_rates = [], []
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, range(2 * clients)))  # warm-up: every client connected
            for _ in range(2 if quick else 3):  # rounds alternate bare and served
                started = time.perf_counter()
                for _ in range(requests // 2):
                    bare()
                bare_rates.append((requests // 2) / (time.perf_counter() - started))
                started = time.perf_counter()
                list(pool.map(one, range(requests)))
                http_rates.append(requests / (time.perf_counter() - started))
        for each in connections:
            each.close()
        bare_rate, http_rate = statistics.median(bare_rates), statistics.median(http_rates)
    section = Section(f"HTTP service vs bare runtime (shipped model on {segmenter.choice.candidate.label}, "
                      "512x512 PNG, /segment)",
                      ["measure", "bare runtime", "service", "ratio", "target"])  # fmt: skip
    section.rows += [["p50 latency, one client (ms)", 1000 * bare_p50, 1000 * http_p50,
                      f"{http_p50 / bare_p50:.2f}", "<= 1.2"],
                     [f"throughput, {clients} concurrent clients (images/s)", bare_rate, http_rate,
                      f"{http_rate / bare_rate:.2f}", ">= 0.85"]]  # fmt: skip
    section.notes.append(
        "Bare runtime = the same work in-process: decode the PNG, `Segmenter.segment`, encode the palette PNG. "
        f"Server and measurements alternate, so they never compete for the cores. The {clients} clients are "
        "threads of the benchmark process, each holding one keep-alive connection (as a real client does); "
        "rates are medians "
        "over alternating rounds."
    )
    return section


def service_memory(scratch: Path, quick: bool) -> Section:
    """The server's resident memory under a long mix of good and hostile requests (issue: flat from 1,000 on)."""
    import random

    import httpx
    import psutil

    from tests.devserver import running_service
    from tests.hostile import hostile_request

    env = {**os.environ, "BENTOML_HOME": str(scratch / "bentoml-memory"), "BENTOML_DO_NOT_TRACK": "true"}
    log = scratch / "serve-memory.log"
    checkpoints = (200, 1000, 3000) if not quick else (200, 600, 1200)
    frames = [road_images(1, size)[0] for size in ((360, 480), (240, 320), (97, 151), (512, 512))]
    bodies = []
    for pixels in frames:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        bodies.append(buffer.getvalue())
    rng = random.Random(7)
    good = [("/segment", {}), ("/overlay", {"alpha": "0.4", "format": "jpeg"}), ("/heatmaps", {"format": "npz"}),
            ("/analyze", {})]  # fmt: skip
    rows = []
    with running_service(env, log) as (url, process), httpx.Client(base_url=url, timeout=60) as client:

        def rss() -> float:
            root = psutil.Process(process.pid)
            return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)] if p.is_running()) / 1e6

        done, statuses = 0, {}
        for target in checkpoints:
            while done < target:
                if done % 2 == 0:
                    path, fields = good[done // 2 % len(good)]
                    body = bodies[done // 2 % len(bodies)]
                    answer = client.post(path, params=fields, content=body, headers={"content-type": "image/png"})
                else:
                    try:
                        answer = client.request(**hostile_request(rng))
                    except httpx.HTTPError:
                        done += 1
                        continue
                statuses[answer.status_code // 100] = statuses.get(answer.status_code // 100, 0) + 1
                done += 1
            rows.append([target, rss(), log.read_text().count("Traceback")])
    section = Section("Service memory under mixed good and hostile traffic (shipped model)",
                      ["requests", "server RSS (MB)", "tracebacks in the log"])  # fmt: skip
    section.rows = rows
    growth = rows[-1][1] / rows[-2][1] - 1
    section.notes.append(
        f"Half the requests are good (four endpoints, four sizes up to 512x512, raw-body PNG), half come from the "
        f"hostile-request generator of tests/hostile.py. Status classes seen: {dict(sorted(statuses.items()))} "
        f"(x100). RSS of the server's process tree; growth from {rows[-2][0]} to {rows[-1][0]} requests: "
        f"{100 * growth:+.1f}% (target: within 5%)."
    )
    return section
