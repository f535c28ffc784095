"""Item 6: CUDA against TensorRT, float32 against float16, on a GPU; and the first request of a new image size.

Runs only where a GPU is present (never in tests or CI). The model is the item-1 FCN-8s ResNet-18 (random
weights, 21 classes), exported in float32 and, as `segserve export --fp16` writes it, float16. TensorRT runs the
float32 file with and without its own fp16 mode. Sessions use the runtime's settings
(segserve.runtime.session.provider_settings: engine and timing cache, heuristic cuDNN algorithm search).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks.common import Section, road_images
from segserve.runtime.session import provider_settings, session_options

#: (label, precision of the file, providers, extra TensorRT options)
Config = tuple[str, str, list[str], dict[str, str]]


def configurations(tensorrt: bool) -> list[Config]:
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    configs: list[Config] = [("CUDA", "float32", cuda, {}), ("CUDA", "float16", cuda, {})]
    if tensorrt:
        trt = ["TensorrtExecutionProvider", *cuda]
        configs += [("TensorRT", "float32", trt, {}), ("TensorRT", "float16", trt, {"trt_fp16_enable": "True"})]
    return configs


def open_session(path: Path, providers: list[str], extra: dict[str, str], cache: Path) -> ort.InferenceSession:
    entries = provider_settings(providers, cache=cache)
    entries = [(e[0], {**e[1], **extra}) if isinstance(e, tuple) and e[0].startswith("Tensorrt") else e
               for e in entries]  # fmt: skip
    return ort.InferenceSession(str(path), session_options(), providers=entries)


def throughput_and_first_request(
    files: dict[str, Path],
    configs: Sequence[Config],
    sizes: Sequence[int],
    batches: Sequence[int],
    repeats: int,
    scratch: Path,
) -> tuple[Section, Section]:
    """images/s per configuration, size and batch; and the latency of the first run at a size never seen before,
    with an empty cache and again in a new session over the filled cache."""
    speed = Section("6. GPU: images/s (FCN-8s ResNet-18, labels out)",
                    ["provider", "file precision", "TensorRT fp16", "input", "batch", "ms/batch", "images/s",
                     "active providers"])  # fmt: skip
    first = Section("6. GPU: first request at a new image size (640x480 after warming at 512x512)",
                    ["provider", "file precision", "TensorRT fp16", "cache", "first ms", "next ms"])  # fmt: skip
    warm, new_size = np.stack(road_images(1, (512, 512))), np.stack(road_images(1, (480, 640)))
    for index, (label, precision, providers, extra) in enumerate(configs):
        cache = scratch / f"engines-{index}"
        trt16 = "yes" if extra.get("trt_fp16_enable") else ""
        for state in ("empty", "filled"):
            session = open_session(files[precision], providers, extra, cache)
            session.run(["labels"], {"images": warm})
            started = time.perf_counter()
            session.run(["labels"], {"images": new_size})
            first_ms = 1000 * (time.perf_counter() - started)
            started = time.perf_counter()
            session.run(["labels"], {"images": new_size})
            first.rows.append([label, precision, trt16, state, first_ms, 1000 * (time.perf_counter() - started)])
        for size in sizes:
            for batch in batches:
                images = np.stack(road_images(batch, (size, size)))
                session.run(["labels"], {"images": images})  # shape seen once (engine built, algorithms chosen)
                times = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    session.run(["labels"], {"images": images})
                    times.append(time.perf_counter() - started)
                seconds = statistics.median(times)
                speed.rows.append([label, precision, trt16, f"{size}x{size}", batch, 1000 * seconds,
                                   batch / seconds, ", ".join(p.replace("ExecutionProvider", "")
                                                              for p in session.get_providers())])  # fmt: skip
    return speed, first


def gpu_sections(scratch: Path, quick: bool) -> list[Section]:
    from benchmarks.models import export_pipeline, fcn_pipeline
    from segserve.runtime.session import gpu_present, prepare_gpu_libraries, tensorrt_present

    if not gpu_present():
        section = Section("6. GPU (CUDA / TensorRT execution providers)", ["measure", "value"])
        section.rows.append(["GPU", "none on this machine: not measured"])
        section.notes.append(
            f"onnxruntime here lists {ort.get_available_providers()}, but with no GPU device the runtime selects "
            "CPUExecutionProvider only (segserve.runtime.session.choose_providers); run `python -m benchmarks` on a "
            "GPU host to fill this table (benchmarks/gpu.py)."
        )
        return [section]
    prepare_gpu_libraries()
    pipeline = fcn_pipeline("resnet18")
    files = {"float32": export_pipeline(pipeline, scratch / "gpu-fp32.onnx", "resnet18", "8s"),
             "float16": export_pipeline(pipeline, scratch / "gpu-fp16.onnx", "resnet18", "8s", fp16=True)}  # fmt: skip
    tensorrt = tensorrt_present()
    speed, first = throughput_and_first_request(files, configurations(tensorrt), (512, 1024), (1, 8),
                                                5 if quick else 20, scratch)  # fmt: skip
    speed.notes.append(
        "Medians after one untimed run of each shape. 'active providers' is `session.get_providers()`: what ran. "
        + ("" if tensorrt else "TensorRT's library is not installed here: CUDA only.")
    )
    first.notes.append(
        "TensorRT builds an engine for a shape range it has not seen ('empty': a fresh cache folder); a new session "
        "over the filled cache loads it instead. CUDA chooses cuDNN algorithms heuristically "
        "(`cudnn_conv_algo_search=HEURISTIC`), so a new size costs little there."
    )
    return [speed, first]
