"""Build segserve's container image with the local Docker daemon: ``deploy/build-image cpu|gpu [TAG]``.

* ``cpu``: onnxruntime (CPU build) and OpenVINO; no CUDA libraries, no compilers.
* ``gpu``: onnxruntime-gpu with its CUDA and cuDNN wheels (it runs on CPU-only hosts too).

Both are torch-free and carry the default model and its int8 twin. The base image comes from
``SEGSERVE_BASE_IMAGE``: unset, BentoML's usual ``python:3.11-slim``; ``debootstrap``, a Debian bookworm + Python
3.11 base built here from Debian's packages (for hosts that cannot reach a registry); anything else is used as the
base image's name. ``SEGSERVE_TRUST_HOST_CA=1`` adds the host's CA bundle to the base and points pip/uv at it, for
networks that re-sign TLS. Hardened: runs as uid 1034, works with ``docker run --read-only`` (tmpfs on /tmp and the
home folder), a HEALTHCHECK on /livez, labels with the segserve version and model. Prints the image size.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BASE = "python:3.11-slim"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
PACKAGES = {
    "cpu": ["onnxruntime>=1.20", "openvino>=2024.4"],
    "gpu": ["onnxruntime-gpu[cuda,cudnn]>=1.23"],
}
TEMPLATE = "deploy/Dockerfile.template"  # relative to the project: BentoML refuses absolute template paths


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(command), file=sys.stderr, flush=True)
    result = subprocess.run(command, **kwargs)
    if result.returncode != 0:
        shown = (result.stdout or "")[-3000:] + (result.stderr or "")[-3000:] if kwargs.get("text") else ""
        raise SystemExit(f"build-image: {command[0]} {' '.join(command[1:3])} failed ({result.returncode})\n{shown}")
    return result


def debootstrap_base(trust_ca: bool, work: Path) -> str:
    """Debian bookworm minbase with Python 3.11 and uv, from Debian's packages; returns the image name."""
    tag = "segserve-base:bookworm-py311" + ("-hostca" if trust_ca else "")
    if subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0:
        return tag
    rootfs = work / "rootfs"
    mirror = os.environ.get("SEGSERVE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
    run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm",
         str(rootfs), mirror])  # fmt: skip
    for clutter in ("usr/share/doc", "usr/share/man", "usr/share/locale", "var/cache/apt", "var/lib/apt/lists"):
        shutil.rmtree(rootfs / clutter, ignore_errors=True)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    run(["docker", "import", "-", f"{tag}-rootfs"], stdin=tar.stdout, stdout=subprocess.DEVNULL)
    tar.wait()
    context = work / "base"
    context.mkdir()
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if uv is None:
        raise SystemExit("build-image: `uv` is needed (pip install uv) to put it into the base image")
    shutil.copy2(uv, context / "uv")
    lines = [f"FROM {tag}-rootfs", "COPY uv /usr/local/bin/uv"]
    if trust_ca:
        shutil.copy2(HOST_CA, context / "host-ca.crt")
        lines += ["COPY host-ca.crt /etc/ssl/certs/ca-certificates.crt"]
    bundle = "/etc/ssl/certs/ca-certificates.crt"
    lines += [f"ENV SSL_CERT_FILE={bundle} UV_NATIVE_TLS=1 PIP_CERT={bundle}"]
    (context / "Dockerfile").write_text("\n".join(lines) + "\n")
    run(["docker", "build", "-q", "-t", tag, str(context)], stdout=subprocess.DEVNULL)
    return tag


def bentofile(variant: str, base: str, trust_ca: bool, work: Path) -> Path:
    """The project's bentofile with this variant's packages, base image and hardening template."""
    spec = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    kept = [p for p in spec["python"]["packages"] if not p.startswith(("onnxruntime", "openvino"))]
    spec["python"]["packages"] = kept + PACKAGES[variant]
    spec["include"] = [*spec["include"], "deploy/container_init.py"]  # the image's PID 1
    docker = {"base_image": base, "dockerfile_template": TEMPLATE}  # (distro, python: those of the base)
    if trust_ca:
        docker["env"] = {"SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt", "UV_NATIVE_TLS": "1"}
    spec["docker"] = docker
    path = work / f"bentofile-{variant}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in PACKAGES or len(argv) > 2:
        print("usage: deploy/build-image cpu|gpu [TAG]", file=sys.stderr)
        return 2
    variant = argv[0]
    from segserve import __version__

    tag = argv[1] if len(argv) > 1 else f"segserve-{variant}:{__version__}"
    trust_ca = os.environ.get("SEGSERVE_TRUST_HOST_CA", "") not in ("", "0", "false")
    with tempfile.TemporaryDirectory(prefix="segserve-image-") as scratch:
        work = Path(scratch)
        base = os.environ.get("SEGSERVE_BASE_IMAGE") or DEFAULT_BASE
        if base == "debootstrap":
            base = debootstrap_base(trust_ca, work)
        env = {**os.environ, "BENTOML_HOME": str(work / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # `bentoml build` calls uv
        if subprocess.run(["docker", "buildx", "version"], capture_output=True).returncode != 0:
            env["DOCKER_BUILDKIT"] = "0"  # Debian's docker.io has no buildx: the classic builder
        built = run([sys.executable, "-m", "bentoml", "build", "-f", str(bentofile(variant, base, trust_ca, work)),
                     "--output", "tag"], cwd=ROOT, env=env, capture_output=True, text=True)  # fmt: skip
        bento = built.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
        default = json.loads((ROOT / "models" / "default.json").read_text())["model"]
        labels = {"org.opencontainers.image.title": "segserve", "org.opencontainers.image.version": __version__,
                  "segserve.version": __version__, "segserve.model": default, "segserve.variant": variant}  # fmt: skip
        options = ["--opt", "network=host"] + [x for k, v in labels.items() for x in ("--opt", f"label={k}={v}")]
        # cwd "/": containerize checks that the bento's own copy of the template (in a temporary folder) lies
        # below the working directory
        run([sys.executable, "-m", "bentoml", "containerize", bento, "-t", tag, *options], cwd="/", env=env)
    size = run(["docker", "image", "inspect", tag, "--format", "{{.Size}}"], capture_output=True, text=True).stdout
    print(f"built {tag} ({variant}, base {base}): {int(size) / 1e9:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
