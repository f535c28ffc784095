"""The service's settings come from the mapping they are given, with named errors for bad values."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from segserve.hardware import gpu_present
from segserve.settings import Settings


def test_settings_read_the_given_environment_only(monkeypatch) -> None:
    monkeypatch.setenv("SEGSERVE_MAX_PIXELS", "999")  # the process environment must not leak into a given mapping
    given = {"SEGSERVE_MAX_PIXELS": "1000", "SEGSERVE_TIMEOUT": "5", "SEGSERVE_THREADS": "3",
             "SEGSERVE_INFERENCE_SLOTS": "4", "SEGSERVE_MAX_CONCURRENCY": "7"}  # fmt: skip
    settings = Settings.from_env(given)
    assert (settings.max_pixels, settings.timeout, settings.threads) == (1000, 5, 3)
    assert (settings.inference_slots, settings.max_concurrency) == (4, 7)
    defaults = Settings.from_env({})
    assert defaults.max_pixels == 150_000_000 and defaults.threads is None and defaults.timeout == 120
    assert defaults.inference_slots == (2 if gpu_present() else 1)
    assert Settings.from_env().max_pixels == 999  # no mapping: the process environment


@pytest.mark.parametrize("name", ["SEGSERVE_MAX_PIXELS", "SEGSERVE_TIMEOUT", "SEGSERVE_THREADS"])
@pytest.mark.parametrize("value", ["0", "-3", "lots", "1.5"])
def test_bad_values_are_named(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"{name} must be a positive integer, got '{value}'"):
        Settings.from_env({name: value})


def test_every_variable_is_documented_once_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for variable in Settings.variables().values():
        assert readme.count(f"| `{variable}` |") == 1, variable


def test_info_prints_the_effective_settings(segserve_command: list[str], small_model) -> None:
    path, _ = small_model
    env = {**os.environ, "SEGSERVE_MAX_PIXELS": "12345"}
    result = subprocess.run(
        [*segserve_command, "info", str(path)], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    settings = {entry["variable"]: entry["value"] for entry in json.loads(result.stdout)["settings"]}
    assert settings["SEGSERVE_MAX_PIXELS"] == 12345 and settings["SEGSERVE_TIMEOUT"] == 120
    assert set(settings) == set(Settings.variables().values())
