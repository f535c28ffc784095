"""A user's `pip install .` (not editable): the built wheel in a fresh venv segments with the shipped default model."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
from PIL import Image

from segserve.runtime import Segmenter

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_in_a_fresh_venv_finds_the_default_model(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy: building writes build/ and egg-info beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "segserve", "models"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(
            ROOT / name,
            source / name,
            **({"ignore": shutil.ignore_patterns("__pycache__")} if name == "segserve" else {}),
        )
    build = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("segserve-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"

    def run(*command: str, **options) -> subprocess.CompletedProcess:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, **options)
        assert result.returncode == 0, result.stderr
        return result

    run(sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel))
    # The dependencies (onnxruntime, bentoml, ...) come from this environment, appended after the venv's own
    # site-packages: segserve itself can only be the wheel's copy.
    purelib = run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    (Path(purelib) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    pixels = np.random.default_rng(0).integers(0, 256, size=(90, 120, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "frame.png")
    work = tmp_path / "elsewhere"  # not the source tree
    work.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SEGSERVE_PROVIDERS": "CPUExecutionProvider"}
    run(str(venv / "bin" / "segserve"), "segment", str(tmp_path / "frame.png"), "-o", "out", "--no-progress",
        cwd=work, env=env)  # fmt: skip
    where = run(str(python), "-c", "import segserve.runtime as r; print(r.__file__, r.default_model_path())",
                cwd=work, env=env).stdout  # fmt: skip
    assert where.startswith(str(venv)) and "share/segserve/models/" in where, where
    with Image.open(work / "out" / "frame.labels.png") as labels:
        assert np.array_equal(np.asarray(labels), Segmenter(threads=2).segment(pixels).labels)
