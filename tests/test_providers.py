"""Execution providers: which are chosen, with what settings, and the GPU libraries found before a GPU session."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from segserve.runtime import session as providers


def test_cpu_host_runs_on_the_cpu_only() -> None:
    if providers.gpu_present():
        pytest.skip("this host has a GPU")  # the CI host has none; on a GPU host the next test covers the choice
    assert providers.choose_providers() == ["CPUExecutionProvider"]


@pytest.mark.parametrize("trt", [True, False])
def test_gpu_host_offers_tensorrt_only_where_it_loads(monkeypatch, trt: bool) -> None:
    # No GPU here: pretend one is present, with onnxruntime-gpu's providers; the library loading behind it is real.
    monkeypatch.setattr(providers, "gpu_present", lambda: True)
    offered = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(providers.ort, "get_available_providers", lambda: offered)
    monkeypatch.setattr(providers, "tensorrt_present", lambda: trt)
    chosen = providers.choose_providers()
    expected = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert chosen == (["TensorrtExecutionProvider", *expected] if trt else expected)


def test_provider_settings_cache_engines_and_keep_new_shapes_cheap(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SEGSERVE_TRT_CACHE", str(tmp_path / "engines"))
    trt, cuda, cpu = providers.provider_settings(
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    assert trt[0] == "TensorrtExecutionProvider" and (tmp_path / "engines").is_dir()
    assert trt[1]["trt_engine_cache_enable"] == "True" and trt[1]["trt_engine_cache_path"] == str(tmp_path / "engines")
    assert trt[1]["trt_timing_cache_path"] == str(tmp_path / "engines")
    assert cuda == ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"})
    assert cpu == "CPUExecutionProvider"
    (tmp_path / "file").write_text("not a folder")
    unwritable = providers.provider_settings(["TensorrtExecutionProvider"], cache=tmp_path / "file" / "engines")
    assert unwritable == ["TensorrtExecutionProvider"]  # no cache, but the provider still runs


def test_gpu_libraries_from_wheels_are_found_before_a_gpu_session(torchless_env, tmp_path: Path) -> None:
    """A serving image gets CUDA from the nvidia-* wheels, off the loader's path: without the preload onnxruntime's
    CUDA provider fails on libcublasLt and quietly runs on the CPU even on a GPU host. With onnxruntime's CPU build
    (the base install) asking for CUDA is a clear error instead."""
    script = tmp_path / "open.py"
    script.write_text(
        "from segserve.runtime import load_model\n"
        "model = load_model('models/camvid-8s-resnet18.onnx', ['CUDAExecutionProvider', 'CPUExecutionProvider'])\n"
        "maps = open('/proc/self/maps').read()\n"
        "print('PROVIDERS', model.providers, 'CUBLASLT', 'libcublasLt.so' in maps, 'CUDNN', 'libcudnn' in maps)\n"
    )
    env = {**torchless_env, "PYTHONPATH": torchless_env["PYTHONPATH"] + ":" + str(Path.cwd())}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env,
                            cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():  # the CPU build (the base install)
        assert result.returncode != 0 and "are not available here (available: [" in result.stderr, result.stderr
        return
    # onnxruntime-gpu (the gpu extra, the GPU image): the libraries are found before the session opens
    assert result.returncode == 0, result.stderr
    assert "CPUExecutionProvider" in result.stdout  # a CPU host falls back; a GPU host runs CUDA first
    wheels = importlib.util.find_spec("nvidia") is not None
    if wheels:  # the dev install has them (PyTorch's CUDA build pulls them in), as the container does
        assert "CUBLASLT True" in result.stdout and "CUDNN True" in result.stdout, result.stdout
        assert "libcublasLt.so" not in result.stderr, result.stderr  # what fails without the preload
