"""DEPLOYMENT.md maps the guide's commands onto shipped files; QUICKSTART.md and the files exist."""

from __future__ import annotations

import pytest

from tests.deploy.conftest import REPO

DEPLOYMENT = REPO / "DEPLOYMENT.md"
QUICKSTART = REPO / "QUICKSTART.md"

# Commands of the deployment guide, each of which DEPLOYMENT.md must show working on what we ship.
GUIDE_COMMANDS = [
    "docker build -t llm-service:1.0.0 .",
    "HF_HOME=/mnt/models bash model-download.sh",
    "docker-compose up -d",
    "kubectl create namespace rag-system",
    "kubectl apply -f llm-service-config.yaml",
    "kubectl apply -f llm-service-secret.yaml",
    "kubectl apply -f llm-service-service.yaml",
    "kubectl apply -f llm-service-pod.yaml",
    "curl http://localhost:8002/health | jq .dependencies",
]
SHIPPED = [
    "Dockerfile",
    "Dockerfile.cpu",
    ".dockerignore",
    "docker-compose.yml",
    "docker-compose.cpu.yml",
    "model-download.sh",
    "scripts/model-download.sh",
    "deploy/kubernetes/namespace.yaml",
    "deploy/kubernetes/llm-service-config.yaml",
    "deploy/kubernetes/llm-service-secret.yaml",
    "deploy/kubernetes/llm-service-service.yaml",
    "deploy/kubernetes/llm-service-pod.yaml",
    "deploy/kubernetes/llm-service-pvc.yaml",
    "deploy/kubernetes/llm-service-deployment.yaml",
    "deploy/kubernetes/kustomization.yaml",
    "deploy/grafana/llm-service-dashboard.json",
    "deploy/prometheus/prometheus.yml",
]
METRICS = [
    "llm_tokens_generated_total",
    "llm_inference_duration_seconds",
    "llm_model_loaded",
    "llm_requests_total",
]


@pytest.mark.parametrize("path", SHIPPED)
def test_shipped_file_exists_and_is_documented(path: str) -> None:
    assert (REPO / path).is_file()
    assert path in DEPLOYMENT.read_text(encoding="utf-8")


@pytest.mark.parametrize("command", GUIDE_COMMANDS)
def test_guide_command_is_mapped(command: str) -> None:
    assert command in DEPLOYMENT.read_text(encoding="utf-8")


def test_docs_name_the_metrics_and_link_each_other() -> None:
    deployment = DEPLOYMENT.read_text(encoding="utf-8")
    quickstart = QUICKSTART.read_text(encoding="utf-8")
    assert all(metric in deployment for metric in METRICS)
    assert "(QUICKSTART.md)" in deployment and "(DEPLOYMENT.md)" in quickstart
    assert "docker-compose.cpu.yml" in quickstart and "Dockerfile.cpu" in quickstart
