"""Package-level promises: a torch-free import, and the README's commands that CI runs."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def heavy_modules_after(imports: str, heavy: tuple[str, ...]) -> list[str]:
    """Which of ``heavy`` a fresh interpreter has loaded after ``import {imports}``."""
    code = f"import sys, {imports}; print(','.join(sorted(m for m in {heavy!r} if m in sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [m for m in result.stdout.strip().split(",") if m]


def test_importing_segserve_does_not_import_torch_or_onnxruntime() -> None:
    imports = "segserve, segserve.cli, segserve.modelcard, segserve.metrics, segserve.datasets"
    assert heavy_modules_after(imports, ("torch", "torchvision", "onnx", "onnxruntime")) == []


def test_runtime_imports_no_torch() -> None:
    imports = "segserve.runtime, segserve.images, segserve.training.evaluate"
    assert heavy_modules_after(imports, ("torch", "torchvision", "onnx")) == []


def test_cli_help_does_not_import_torch() -> None:
    code = (
        "import sys\nfrom segserve.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().endswith("False")


def _readme_command(label: str) -> str:
    """The shell command in the README's fenced block that follows the line containing ``label``."""
    text = (ROOT / "README.md").read_text()
    match = re.search(re.escape(label) + r".*?```(?:bash|sh)?\n(.+?)\n```", text, re.DOTALL)
    assert match, f"README has no command block after {label!r}"
    return match.group(1).strip()


def test_ci_runs_exactly_the_readme_test_command() -> None:
    command = _readme_command("Run the tests")
    ci = (ROOT / ".ci" / "run").read_text()
    assert command in ci.splitlines()
    assert "set -euo pipefail" in ci


def test_ruff_clean() -> None:
    ruff = Path(sys.executable).parent / "ruff"
    for args in (["check", "."], ["format", "--check", "."]):
        result = subprocess.run([str(ruff), *args], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_readme_main_job_serves_the_service_the_tests_start() -> None:
    command = _readme_command("start the main job")
    assert command.startswith("python3 -m venv .venv && .venv/bin/pip install -e . && ")
    assert command.endswith(".venv/bin/bentoml serve service:Segmentation")
    from devserver import SERVICE  # what tests/test_service.py and the benchmarks start

    assert command.endswith(f".venv/bin/bentoml serve {SERVICE}")


def _package_modules() -> dict[str, ast.Module]:
    return {str(p.relative_to(ROOT)): ast.parse(p.read_text()) for p in sorted((ROOT / "segserve").rglob("*.py"))}


def test_no_function_in_the_package_is_longer_than_80_lines() -> None:
    long = [
        f"{name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for name, tree in _package_modules().items()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80
    ]
    assert long == []


def test_only_the_batch_side_imports_the_batch_engines_and_ray() -> None:
    """The service never loads the batch command, its Ray engine or Ray; only the Ray engine imports Ray."""
    importers: dict[str, set[str]] = {"segserve.batch": set(), "segserve.distributed": set(), "ray": set()}
    for name, tree in _package_modules().items():
        for node in ast.walk(tree):
            modules = [node.module] if isinstance(node, ast.ImportFrom) else []
            modules += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            for module in modules:
                root = "ray" if module and module.split(".")[0] == "ray" else module
                if root in importers:
                    importers[root].add(name)
    assert importers["segserve.batch"] == {"segserve/cli.py", "segserve/distributed.py"}
    assert importers["segserve.distributed"] == {"segserve/cli.py"}
    assert importers["ray"] == {"segserve/distributed.py"}
