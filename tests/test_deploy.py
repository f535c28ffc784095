"""deploy/kubernetes: the manifests parse, their probes hit endpoints a real server answers, the ports line up, and
the pods run non-root on a read-only root filesystem (the GPU variant asking for a GPU)."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
import yaml
from devserver import running_service

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "deploy" / "kubernetes"


def documents() -> dict[str, dict]:
    found = {}
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            found[f"{document['kind']}/{document['metadata']['name']}"] = document
    return found


def containers(deployment: dict) -> list[dict]:
    return deployment["spec"]["template"]["spec"]["containers"]


@pytest.fixture(scope="module")
def served_paths(tmp_path_factory) -> tuple[str, set[str]]:
    home = tmp_path_factory.mktemp("bentoml-home")
    env = {**os.environ, "BENTOML_HOME": str(home), "SEGSERVE_THREADS": "1"}
    with running_service(env, home / "serve.log") as (url, _):
        spec = httpx.get(f"{url}/docs.json", timeout=30).json()
        yield url, set(spec["paths"])


def test_manifests_parse_and_reference_each_other() -> None:
    found = documents()
    assert {"Deployment/segserve", "Deployment/segserve-gpu", "Service/segserve",
            "HorizontalPodAutoscaler/segserve"} <= set(found)  # fmt: skip
    service = found["Service/segserve"]
    for name in ("Deployment/segserve", "Deployment/segserve-gpu"):
        labels = found[name]["spec"]["template"]["metadata"]["labels"]
        assert found[name]["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert service["spec"]["selector"].items() <= labels.items()  # the Service reaches CPU and GPU pods
        ports = {p["name"]: p["containerPort"] for c in containers(found[name]) for p in c["ports"]}
        assert ports == {"http": 3000}  # BentoML's port, EXPOSEd by the image
        assert all(p["targetPort"] in ports for p in service["spec"]["ports"])
    target = found["HorizontalPodAutoscaler/segserve"]["spec"]["scaleTargetRef"]
    assert f"{target['kind']}/{target['name']}" in found


def test_pods_are_non_root_read_only_and_sized() -> None:
    found = documents()
    for name in ("Deployment/segserve", "Deployment/segserve-gpu"):
        pod = found[name]["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1034
        for container in pod["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert {"requests", "limits"} <= set(container["resources"])
            assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])  # what the server writes
        assert pod["terminationGracePeriodSeconds"] >= 120  # requests in flight finish (SEGSERVE_TIMEOUT)
    gpu = containers(found["Deployment/segserve-gpu"])[0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in containers(found["Deployment/segserve"])[0]["resources"]["limits"]


def test_probes_point_at_endpoints_the_server_answers(served_paths) -> None:
    url, paths = served_paths
    for name in ("Deployment/segserve", "Deployment/segserve-gpu"):
        for container in containers(documents()[name]):
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                check = container[probe]["httpGet"]
                assert check["port"] == "http" and check["path"] in paths, (name, probe)
                assert httpx.get(url + check["path"], timeout=10).status_code == 200
