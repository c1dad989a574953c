"""Every environment variable the images, compose files and manifests give llm-service is one it reads."""

from __future__ import annotations

import re
from typing import Any

import pytest

from llm_service.config.settings import known_env_vars
from tests.deploy.conftest import REPO, env_names, load_compose, load_manifests

# Read by something other than our settings: the Hugging Face hub, vLLM, the CUDA stack, Python.
OTHER_VARS = {"HF_HOME", "HF_HUB_CACHE", "HF_TOKEN", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "PATH"}
OTHER_PREFIXES = ("VLLM_", "NVIDIA_", "CUDA_")


def unknown(names: list[str]) -> list[str]:
    known = known_env_vars()
    return sorted(
        name
        for name in set(names)
        if name not in known and name not in OTHER_VARS and not name.startswith(OTHER_PREFIXES)
    )


def dockerfile_env(name: str) -> list[str]:
    """Names set by the ENV instructions of the last stage (the image that runs)."""
    text = (REPO / name).read_text(encoding="utf-8").replace("\\\n", " ")
    last_stage = re.split(r"^FROM\s", text, flags=re.MULTILINE)[-1]
    names = []
    for line in last_stage.splitlines():
        if line.startswith("ENV "):
            names += [token.split("=", 1)[0] for token in line[4:].split() if "=" in token]
    return names


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfile_env_is_known(dockerfile: str) -> None:
    names = dockerfile_env(dockerfile)
    assert "APP_PORT" in names and "HF_HUB_CACHE" in names
    assert unknown(names) == []


@pytest.mark.parametrize("compose_file", ["docker-compose.yml", "docker-compose.cpu.yml"])
def test_compose_env_is_known(compose_file: str) -> None:
    names = env_names(load_compose(compose_file)["services"]["llm-service"]["environment"])
    assert names
    assert unknown(names) == []


def containers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    spec = manifest["spec"]
    pod = spec["template"]["spec"] if manifest["kind"] == "Deployment" else spec
    return pod["containers"]


def test_kubernetes_env_is_known() -> None:
    manifests = [doc for docs in load_manifests().values() for doc in docs]
    config_maps = {doc["metadata"]["name"]: doc for doc in manifests if doc["kind"] == "ConfigMap"}
    secrets = {doc["metadata"]["name"]: doc for doc in manifests if doc["kind"] == "Secret"}
    workloads = [doc for doc in manifests if doc["kind"] in ("Pod", "Deployment")]
    assert {doc["kind"] for doc in workloads} == {"Pod", "Deployment"}
    for workload in workloads:
        for container in containers(workload):
            names = [item["name"] for item in container.get("env", [])]
            for source in container.get("envFrom", []):
                # envFrom turns every key of the ConfigMap into a variable.
                names += list(config_maps[source["configMapRef"]["name"]]["data"])
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]]["stringData"], ref
            assert "LLM_MODEL_STANDARD" in names and "LANGFUSE_SECRET_KEY" in names
            assert unknown(names) == [], workload["kind"]
