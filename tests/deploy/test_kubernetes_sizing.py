"""Kubernetes manifests against the service's sizing: GPUs per engine, the HF token, drain times, probes."""

from __future__ import annotations

import copy
import subprocess
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import K8S_DIR, find_tool, load_manifests
from tests.deploy.test_lint import kubernetes_validate

OVERLAY = K8S_DIR.parent / "overlays" / "tensor-parallel-2"
ENGINE_SHUTDOWN_SECONDS = 10  # vLLM gives an engine core 5 s before SIGKILL; engines stop in parallel


def documents() -> list[dict[str, Any]]:
    return [doc for docs in load_manifests().values() for doc in docs]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"] if workload["kind"] == "Deployment" else workload["spec"]


def service_container(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = (c for c in pod_spec(workload)["containers"] if c["name"] == "llm-service")
    return container


def config(docs: list[dict[str, Any]]) -> dict[str, str]:
    (config_map,) = (doc for doc in of_kind(docs, "ConfigMap") if doc["metadata"]["name"] == "llm-config")
    return config_map["data"]


def assert_gpus_match_tensor_parallel(docs: list[dict[str, Any]]) -> int:
    tensor_parallel = int(config(docs)["LLM_TENSOR_PARALLEL_SIZE"])
    workloads = of_kind(docs, "Deployment") + of_kind(docs, "Pod")
    assert workloads
    for workload in workloads:
        resources = service_container(workload)["resources"]
        assert resources["requests"]["nvidia.com/gpu"] == tensor_parallel, workload["kind"]
        assert resources["limits"]["nvidia.com/gpu"] == tensor_parallel, workload["kind"]
    return tensor_parallel


def test_every_workload_reserves_the_gpus_its_engines_are_split_over() -> None:
    assert assert_gpus_match_tensor_parallel(documents()) == 1


def apply_json_patch(doc: dict[str, Any], operations: list[dict[str, Any]]) -> None:
    """RFC 6902 `replace` operations, as kustomize applies an overlay's patches."""
    for operation in operations:
        assert operation["op"] == "replace", operation
        keys = [part.replace("~1", "/").replace("~0", "~") for part in operation["path"].split("/")[1:]]
        target: Any = doc
        for key in keys[:-1]:
            target = target[int(key)] if isinstance(target, list) else target[key]
        last = keys[-1]
        if isinstance(target, list):
            target[int(last)] = operation["value"]
        else:
            assert last in target, operation["path"]
            target[last] = operation["value"]


def overlay_documents() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text(encoding="utf-8"))
    assert kustomization["resources"] == ["../../kubernetes"]
    base = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text(encoding="utf-8"))
    manifests = load_manifests()
    docs = [copy.deepcopy(doc) for name in base["resources"] for doc in manifests[name]]
    for patch in kustomization["patches"]:
        target = patch["target"]
        matches = [d for d in docs if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]]
        assert len(matches) == 1, target
        apply_json_patch(matches[0], yaml.safe_load(patch["patch"]))
    return docs


def test_the_tensor_parallel_overlay_changes_the_setting_and_the_gpus_together() -> None:
    docs = overlay_documents()
    assert assert_gpus_match_tensor_parallel(docs) == 2
    (deployment,) = of_kind(docs, "Deployment")
    shm = next(v for v in pod_spec(deployment)["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["sizeLimit"] == "16Gi"


def test_the_tensor_parallel_overlay_renders(tmp_path) -> None:
    kubectl = find_tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the overlay's patches are applied by the test above instead")
    result = subprocess.run([kubectl, "kustomize", str(OVERLAY)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert assert_gpus_match_tensor_parallel([d for d in yaml.safe_load_all(result.stdout) if d]) == 2
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(result.stdout, encoding="utf-8")
    kubernetes_validate([rendered])


def test_the_hf_token_comes_from_its_own_secret() -> None:
    docs = documents()
    secrets = {doc["metadata"]["name"]: doc for doc in of_kind(docs, "Secret")}
    assert set(secrets["hf-token"]["stringData"]) == {"token"}
    assert all("hf" not in key for key in secrets["langfuse-creds"]["stringData"])
    for workload in of_kind(docs, "Deployment") + of_kind(docs, "Pod"):
        env = {item["name"]: item for item in service_container(workload)["env"]}
        ref = env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"], ref["optional"]) == ("hf-token", "token", True)


def test_the_drain_fits_in_the_termination_grace_period() -> None:
    docs = documents()
    grace = int(config(docs)["APP_SHUTDOWN_GRACE_SECONDS"])
    for workload in of_kind(docs, "Deployment") + of_kind(docs, "Pod"):
        command = service_container(workload)["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep"
        total = int(command[1]) + grace + ENGINE_SHUTDOWN_SECONDS
        assert 0 < grace and total <= pod_spec(workload)["terminationGracePeriodSeconds"], workload["kind"]


@pytest.mark.parametrize("name", ["llm-service-deployment.yaml", "llm-service-pod.yaml"])
def test_the_startup_probe_comment_says_what_it_covers(name: str) -> None:
    lines = (K8S_DIR / name).read_text(encoding="utf-8").splitlines()
    index = next(i for i, line in enumerate(lines) if line.strip() == "startupProbe:")
    comment = []
    for line in reversed(lines[:index]):
        if not line.strip().startswith("#"):
            break
        comment.insert(0, line.strip())
    text = " ".join(comment)
    # /health/live answers once HTTP listens, before any model is downloaded or loaded.
    assert "process start" in text and "only readiness waits" in text, text
    probe = service_container(load_manifests()[name][0])["startupProbe"]
    assert probe["httpGet"]["path"] == "/health/live"
