"""The container engine the image tests drive: docker where its daemon answers, podman otherwise.

Also makes what a machine without a reachable image registry lacks: the base images that
Dockerfile.cpu and the CPU compose file name, built from a Debian bookworm minbase made with
debootstrap; and passes the host's pip configuration (index, mirrors, find-links, CA bundle) into
image builds, as a build behind a company mirror needs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[2]
BASES = Path(__file__).resolve().parent / "bases"
PYTHON_BASE = "docker.io/library/python:3.11-slim-bookworm"  # Dockerfile.cpu's PYTHON_IMAGE
REDIS_IMAGE = "docker.io/library/redis:7.4-alpine"  # docker-compose.cpu.yml's redis
MINBASE = "localhost/llm-service-bookworm-minbase:latest"
# podman where crun cannot run containers (cgroups in hybrid mode) or may not set rlimits.
PODMAN_FALLBACK_CONF = '[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\n'
# pip settings that decide where packages come from, and the build arguments that carry them.
PIP_SETTINGS = {
    "index-url": "PIP_INDEX_URL",
    "extra-index-url": "PIP_EXTRA_INDEX_URL",
    "find-links": "PIP_FIND_LINKS",
    "trusted-host": "PIP_TRUSTED_HOST",
    "cert": "PIP_CERT",
}


class EngineUnavailable(Exception):
    """No container engine that can build and run images here (the tests skip, saying why)."""


@dataclass
class Engine:
    name: str  # docker or podman
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    notes: list[str] = field(default_factory=list)

    def run(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.name, *args], capture_output=True, text=True, timeout=timeout, env=self.env, check=False
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"{self.name} {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
        return result

    def has_image(self, image: str) -> bool:
        return self.run("image", "inspect", image, check=False, timeout=60).returncode == 0

    def pull(self, image: str) -> bool:
        return self.run("pull", "-q", image, check=False, timeout=120).returncode == 0

    def compose(self) -> list[str]:
        """The compose command for this engine: docker's plugin, or podman-compose (PyPI)."""
        if self.name == "docker" and self.run("compose", "version", check=False).returncode == 0:
            return ["docker", "compose"]
        tool = shutil.which("podman-compose", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        if self.name == "podman" and tool:
            return [tool]
        raise EngineUnavailable(f"no compose for {self.name} (docker compose, or podman-compose from the dev extra)")


def detect() -> Engine:
    docker = shutil.which("docker")
    if docker and subprocess.run(["docker", "info"], capture_output=True, timeout=60, check=False).returncode == 0:
        return Engine("docker")
    if shutil.which("podman"):
        return Engine("podman")
    raise EngineUnavailable(
        "no container engine: neither a docker daemon that answers nor podman (make test-containers installs podman)"
    )


def usable(engine: Engine, image: str) -> None:
    """Make sure `engine` can run a container of `image`; podman falls back to runc without rlimits."""
    probe = engine.run("run", "--rm", image, "true", check=False, timeout=120)
    if probe.returncode != 0 and engine.name == "podman" and shutil.which("runc"):
        conf = Path(tempfile.mkdtemp(prefix="containers-conf-")) / "containers.conf"
        conf.write_text(PODMAN_FALLBACK_CONF)
        engine.env["CONTAINERS_CONF"] = str(conf)
        engine.notes.append("podman: crun or its default rlimits failed here; used runc without default rlimits")
        probe = engine.run("run", "--rm", image, "true", check=False, timeout=120)
    if probe.returncode != 0:
        raise EngineUnavailable(f"{engine.name} cannot run a container here: {probe.stderr[-500:]}")


def minbase(engine: Engine) -> str:
    """A Debian bookworm minbase image, made with debootstrap (Debian's mirror is reachable)."""
    if engine.has_image(MINBASE):
        return MINBASE
    if not shutil.which("debootstrap"):
        raise EngineUnavailable(
            "the base images cannot be pulled and debootstrap is missing (apt-get install debootstrap)"
        )
    with tempfile.TemporaryDirectory(prefix="bookworm-") as root:
        subprocess.run(
            ["debootstrap", "--variant=minbase", "bookworm", root], check=True, capture_output=True, timeout=900
        )
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        subprocess.run([engine.name, "import", "-", MINBASE], stdin=tar.stdout, env=engine.env, check=True,
                       capture_output=True, timeout=600)  # fmt: skip
        tar.wait()
    engine.notes.append(f"made {MINBASE} with debootstrap")
    return MINBASE


def ensure_image(engine: Engine, image: str, containerfile: Path) -> None:
    """`image` present: already there, pulled, or built from `containerfile` on the minbase."""
    if engine.has_image(image) or engine.pull(image):
        return
    base = minbase(engine)
    usable(engine, base)
    engine.run("build", "--network", "host", "--build-arg", f"MINBASE={base}", "-t", image, "-f", str(containerfile),
               str(containerfile.parent), timeout=900)  # fmt: skip
    engine.notes.append(f"made {image} locally ({containerfile.name})")


def host_pip_settings() -> dict[str, str]:
    """pip's effective settings here (`pip config list`, environment included) that pick sources."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                            check=False, timeout=60).stdout  # fmt: skip
    settings: dict[str, str] = {}
    for line in listed.splitlines():
        match = re.fullmatch(r"(?:[^.]*)\.([a-z-]+)='(.*)'", line.strip())
        if match and match[1] in PIP_SETTINGS:
            settings[match[1]] = match[2]  # later scopes (the environment) win
    return settings


def local_paths(value: str) -> list[str]:
    paths = []
    for item in value.split():
        parsed = urlparse(item)
        path = parsed.path if parsed.scheme == "file" else item if not parsed.scheme else ""
        if parsed.scheme == "file" and Path(path).name == "simple":
            path = str(Path(path).parent)  # a file index links its files relative to `simple/`
        if path and Path(path).exists():
            paths.append(path)
    return paths


def build_arguments(engine: Engine, torch_index: str | None) -> list[str]:
    """Build arguments (and, for podman, read-only mounts of local folders) carrying the host's pip set-up."""
    args = ["--network", "host"]
    if engine.name == "podman":  # podman's default OCI format drops HEALTHCHECK, which docker keeps
        args += ["--format", "docker"]
    if torch_index is not None:
        args += ["--build-arg", f"TORCH_INDEX_URL={torch_index}"]
    for key, value in host_pip_settings().items():
        paths = local_paths(value)
        if paths and engine.name != "podman":
            engine.notes.append(f"pip's {key} names local paths, which a docker build cannot mount: left out")
            continue
        for path in paths:
            args += ["--volume", f"{path}:{path}:ro"]
        args += ["--build-arg", f"{PIP_SETTINGS[key]}={value}"]
    return args


def torch_index() -> str | None:
    """'' when PyTorch's CPU index does not answer (the build then uses pip's own sources), else None."""
    probe = subprocess.run([str(REPO / "scripts" / "torch-index.sh"), sys.executable], capture_output=True,
                           text=True, timeout=60, check=False)  # fmt: skip
    return None if probe.stdout.strip() else ""


def image_facts(engine: Engine, image: str) -> dict[str, object]:
    [info] = json.loads(engine.run("image", "inspect", image).stdout)
    config = info.get("Config") or {}
    return {"user": config.get("User", ""), "size_bytes": int(info.get("Size", 0))}
