"""The ``segserve`` console script, run as a user runs it."""

from __future__ import annotations

import json
import re
import subprocess

import pytest


def run(command: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=300)


def totals(text: str) -> list[int]:
    return [int(n.replace(",", "")) for n in re.findall(r"(\d[\d,]*) \(", text.splitlines()[-1])] or [
        int(re.search(r"total parameters: ([\d,]+)", text).group(1).replace(",", ""))
    ]


def test_summary_vgg16_classifier_and_twin_side_by_side(segserve_command: list[str]) -> None:
    result = run(segserve_command, "summary", "vgg16")
    assert result.returncode == 0, result.stderr
    assert totals(result.stdout) == [138_357_544, 138_357_544]
    assert "equal" in result.stdout.splitlines()[-1]
    fc6 = next(line for line in result.stdout.splitlines() if line.startswith("classifier.0 "))
    assert "25088x4096 + 4096 = 102,764,544" in fc6 and "7x7x512x4096 + 4096 = 102,764,544" in fc6
    assert "3x3x64x128 + 128 = 73,856" in result.stdout


@pytest.mark.parametrize(("variant", "total"), [("32s", 136_152_917), ("16s", 134_815_994), ("8s", 134_489_759)])
def test_summary_vgg16_fcn_reference_counts(segserve_command: list[str], variant: str, total: int) -> None:
    result = run(segserve_command, "summary", "vgg16", "--fcn", variant, "--classes", "21")
    assert result.returncode == 0, result.stderr
    assert totals(result.stdout) == [total]


def test_summary_json_reports_shapes_at_the_requested_input(segserve_command: list[str]) -> None:
    result = run(
        segserve_command, "summary", "resnet18", "--fcn", "8s", "--classes", "11", "--input", "360x480", "--json"
    )
    assert result.returncode == 0, result.stderr
    (model,) = json.loads(result.stdout)["models"]
    layers = {row["name"]: row for row in model["layers"]}
    assert layers["upscore8"]["output"] == "11x384x480"  # padded to a multiple of 32, cropped after
    assert layers["score_fr"]["formula"] == "1x1x512x11 + 11 = 5,643"
    assert model["total"] == sum(row["params"] for row in model["layers"])


def test_backbones_lists_the_registry(segserve_command: list[str]) -> None:
    result = run(segserve_command, "backbones", "--json")
    assert result.returncode == 0, result.stderr
    entries = {e["name"]: e for e in json.loads(result.stdout)}
    assert entries["vgg16"]["params"] == 138_357_544
    assert entries["resnet50"]["taps"]["stride16"] == {"module": "layer3", "channels": 1024}
    table = run(segserve_command, "backbones").stdout
    assert re.search(r"^vgg16 +vgg +138,357,544 +features\.16 \(256\)", table, re.MULTILINE)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["summary", "vgg17"], "unknown backbone 'vgg17'; did you mean vgg19, vgg16"),
        (["summary", "vgg16", "--input", "16x16"], "vgg16 classifier cannot run at 16x16"),
        (["summary", "vgg16", "--input", "0x5"], "input sides must be at least 1"),
        (["summary", "vgg16", "--fcn", "4s"], "invalid choice: '4s'"),
        (["summary", "vgg16", "--fcn", "8s", "--classes", "-3"], "expected a positive integer"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(segserve_command: list[str], args: list[str], message: str) -> None:
    result = run(segserve_command, *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_version(segserve_command: list[str]) -> None:
    result = run(segserve_command, "--version")
    assert result.returncode == 0
    assert re.fullmatch(r"segserve \d+\.\d+\.\d+\S*\n", result.stdout)
