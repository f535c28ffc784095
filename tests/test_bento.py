"""``bentoml build`` works offline and the bento holds the serving side only: no torch, no data, the default model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_bento_builds_with_the_default_model_and_no_torch(tmp_path: Path) -> None:
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "true"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # the venv's uv
    result = subprocess.run([sys.executable, "-m", "bentoml", "build", "--output", "tag"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (bento,) = [p for p in (tmp_path / "home" / "bentos" / "segserve").iterdir() if p.is_dir()]
    requirements = (bento / "env" / "python" / "requirements.txt").read_text().lower()
    assert "onnxruntime" in requirements
    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for name in {re.split(r"[<>=;\[ ]", dependency)[0].lower() for dependency in base} - {"bentoml"}:
        assert name in requirements, f"the bento lacks {name}, a dependency of the serving side"
    assert not any(name in requirements for name in ("torch", "torchvision", "onnxscript", "matplotlib"))

    files = {p.relative_to(bento / "src").as_posix() for p in (bento / "src").rglob("*") if p.is_file()}
    default = json.loads((ROOT / "models" / "default.json").read_text())["model"]
    assert {"service.py", "models/default.json", f"models/{default}", "segserve/serving.py"} <= files
    assert not [f for f in files if f.startswith(("tests/", "runs/", "benchmarks/", "data/")) or "camvid/" in f]
    twin = default.removesuffix(".onnx") + "-int8.onnx"  # the calibrated int8 file the engine choice measures
    assert {f for f in files if f.endswith(".onnx")} == {f"models/{default}", f"models/{twin}"}
    assert yaml.safe_load((bento / "bento.yaml").read_text())["service"] == "service:Segmentation"

    # every segserve module the service imports is inside the bento
    code = (
        "import sys, service; print('\\n'.join(m.__file__ for n, m in sys.modules.items() if n.startswith('segserve')))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    for module in loaded.stdout.split():
        assert Path(module).relative_to(ROOT).as_posix() in files
