"""The engines table: every way this machine can run the shipped model, side by side in one run, the default path
marked, each row's share of its precision's peak, the first request of a new size, and the service on the default."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks.common import Section, alternate, default_model, road_images
from benchmarks.flops import onnx_flops
from segserve.hardware import cpu_model, isa_features, native_bf16
from segserve.runtime import Segmenter
from segserve.runtime.engines import candidates
from segserve.runtime.session import session_options
from segserve.settings import Settings

SIDE = 2048  # the peaks' GEMM: SIDE^3 multiply-adds


def _matmul_model(op: str, input_type: int, output_type: int, weights: np.ndarray) -> bytes:
    """An ONNX graph ``c = op(a, weights)`` with SIDE x SIDE operands and constant (pre-packable) weights."""
    from onnx import helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node(op, ["a", "b"], ["c"])], op,
        [helper.make_tensor_value_info("a", input_type, [SIDE, SIDE])],
        [helper.make_tensor_value_info("c", output_type, [SIDE, SIDE])],
        [numpy_helper.from_array(weights, "b")],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10).SerializeToString()


def int8_peak(threads: int, quick: bool) -> float:
    """GOP/s of onnxruntime's MatMulInteger at 2048^3 (uint8 x int8, constant weights): the CPU's int8 limit."""
    from onnx import TensorProto

    rng = np.random.default_rng(0)
    weights = rng.integers(-128, 128, (SIDE, SIDE), dtype=np.int8)
    model = _matmul_model("MatMulInteger", TensorProto.UINT8, TensorProto.INT32, weights)
    session = ort.InferenceSession(model, session_options(threads), providers=["CPUExecutionProvider"])
    feed = {"a": rng.integers(0, 256, (SIDE, SIDE), dtype=np.uint8)}
    seconds = alternate({"int8": lambda: session.run(["c"], feed)}, 3 if quick else 7)["int8"]
    return 2 * SIDE**3 / seconds / 1e9


def bf16_peak(threads: int, quick: bool) -> float | None:
    """GFLOP/s of a 2048^3 MatMul (constant weights) in OpenVINO with the bf16 precision hint: the CPU's bf16 limit
    (None where the CPU has no native bf16 or OpenVINO is absent)."""
    from segserve.runtime.engines import openvino_available, openvino_core

    if not (native_bf16() and openvino_available()):
        return None
    from onnx import TensorProto

    rng = np.random.default_rng(0)
    model = _matmul_model("MatMul", TensorProto.FLOAT, TensorProto.FLOAT, rng.standard_normal((SIDE, SIDE), np.float32))
    core = openvino_core()
    compiled = core.compile_model(core.read_model(model, b""), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": threads})  # fmt: skip
    request = compiled.create_infer_request()
    feed = {"a": rng.standard_normal((SIDE, SIDE), np.float32)}
    seconds = alternate({"bf16": lambda: request.infer(feed)}, 3 if quick else 7)["bf16"]
    return 2 * SIDE**3 / seconds / 1e9


def _torch_contenders(metadata, frame: np.ndarray, threads: int) -> dict:
    """Eager PyTorch running the same pipeline (random weights: the time does not depend on them)."""
    import torch

    from segserve.training.checkpoint import ModelConfig

    torch.set_num_threads(threads)
    config = ModelConfig(backbone=metadata.backbone, variant=metadata.variant, classes=list(metadata.classes),
                         palette=[list(c) for c in metadata.palette], mean=list(metadata.mean),
                         std=list(metadata.std), input_scale=metadata.input_scale)  # fmt: skip
    pipeline = config.pipeline().eval()
    tensor = torch.from_numpy(frame).permute(0, 3, 1, 2).contiguous()

    def eager() -> None:
        with torch.inference_mode():
            pipeline(tensor).argmax(1)

    contenders = {"PyTorch eager fp32": eager}
    if native_bf16():
        fast = config.pipeline().eval().to(memory_format=torch.channels_last)
        last = tensor.contiguous(memory_format=torch.channels_last)

        def bf16() -> None:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                fast(last).argmax(1)

        contenders["PyTorch bf16 autocast, channels_last"] = bf16
    return contenders


def engines_table(scratch: Path, quick: bool, threads: int) -> Section:
    path = default_model()
    settings = Settings.from_env(
        {"SEGSERVE_CACHE_DIR": str(scratch / "engine-cache"), "SEGSERVE_THREADS": str(threads)}
    )
    default = Segmenter(settings=settings)  # what Segmenter() picks with no options
    frame = np.stack(road_images(1, (360, 480)))
    card = Segmenter(path, engine="onnxruntime", precision="fp32", settings=settings).metadata  # the file's own
    runners = {c.label: Segmenter(engine=c.engine, precision=c.precision, settings=settings)
               for c in candidates(path, card)}  # fmt: skip
    contenders = {label: (lambda s=s: s.engine.run(["labels"], frame)) for label, s in runners.items()}
    contenders = {**_torch_contenders(card, frame, threads), **contenders}
    contenders["default path: Segmenter().segment()"] = lambda: default.segment(frame[0])
    medians = alternate(contenders, 7 if quick else 21, warmup=3)

    from benchmarks.speed import gemm_peak

    fp32_peak = max(gemm_peak(threads, quick=True).values())
    i8_peak = int8_peak(threads, quick)
    b16_peak = bf16_peak(threads, quick)
    gops = onnx_flops(path, {"images": frame}) / 1e9  # counted on the float32 graph (the int8 one has the same)
    chosen = f"{default.choice.candidate.label}"
    fastest = min(medians.values())
    section = Section(f"Engines on this machine: shipped model, one 360x480 frame, {threads} threads",
                      ["engine", "ms/frame", "vs fastest", "GOP/s", "share of its precision's peak"])  # fmt: skip
    for label, seconds in medians.items():
        precision = next((p for p in ("int8", "bf16", "fp32") if p in label), default.choice.candidate.precision)
        peak = {"fp32": fp32_peak, "int8": i8_peak, "bf16": b16_peak}.get(precision)
        rate = gops / seconds
        mark = " **(default)**" if label == chosen else ""
        share = f"{100 * rate / peak:.0f}% of {peak:.0f}" if peak else "(no measured peak)"
        section.rows.append([label + mark, 1000 * seconds, f"{seconds / fastest:.2f}", rate, share])
    first, steady = _new_size(default)
    default_time = medians["default path: Segmenter().segment()"]
    section.notes += [
        f"CPU: {cpu_model()}; ISA features: {', '.join(isa_features()) or 'none of ' + 'avx2/avx512/amx'}. "
        f"Peaks on this machine: fp32 GEMM {fp32_peak:.0f} GFLOP/s (onnxruntime), int8 MatMulInteger 2048^3 "
        f"{i8_peak:.0f} GOP/s ({i8_peak / fp32_peak:.2f}x, onnxruntime)"
        + (f", bf16 MatMul 2048^3 {b16_peak:.0f} GFLOP/s (OpenVINO)" if b16_peak else "")
        + f". The model: {gops:.2f} GOP per 360x480 frame, so "
        f"{1000 * gops / i8_peak:.1f} ms at the int8 limit and {1000 * gops / fp32_peak:.1f} ms at the fp32 limit.",
        f"Default choice: {chosen} ({default.choice.reason}). Acceptance: default path / fastest row "
        f"{default_time / fastest:.2f} (target <= 1.1); eager PyTorch fp32 / default path "
        f"{medians['PyTorch eager fp32'] / default_time:.1f}x (target >= 3); first request at a new size (600x800) "
        f"{1000 * first:.0f} ms vs steady {1000 * steady:.0f} ms = {first / steady:.2f}x (target <= 3).",
        "No GPU on this machine: the CUDA fp32/fp16 and TensorRT fp16/int8 rows (512x512 and 1024x1024, batch 1 and "
        "8) are measured by `python -m benchmarks --only gpu` where one is present.",
    ]
    return section


def _new_size(segmenter: Segmenter) -> tuple[float, float]:
    """(first call, steady median) at a size the engine has not seen."""
    image = road_images(1, (600, 800))[0]
    started = time.perf_counter()
    segmenter.segment(image)
    first = time.perf_counter() - started
    times = []
    for _ in range(5):
        started = time.perf_counter()
        segmenter.segment(image)
        times.append(time.perf_counter() - started)
    return first, float(np.median(times))
