"""The HPA example scales the Deployment on a metric the service exports, served by the adapter rule."""

from __future__ import annotations

import yaml

from llm_service.observability.metrics import Metrics
from tests.deploy.conftest import K8S_DIR
from tests.deploy.test_lint import kubernetes_validate

AUTOSCALING = K8S_DIR / "autoscaling"


def load(name: str) -> dict:
    return yaml.safe_load((AUTOSCALING / name).read_text(encoding="utf-8"))


def test_hpa_is_a_valid_manifest_on_the_deployment() -> None:
    kubernetes_validate([AUTOSCALING / "llm-service-hpa.yaml"])
    hpa = load("llm-service-hpa.yaml")
    deployment = yaml.safe_load((K8S_DIR / "llm-service-deployment.yaml").read_text(encoding="utf-8"))
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["metadata"]["namespace"] == deployment["metadata"]["namespace"]


def test_hpa_metric_is_exported_and_served_by_the_adapter_rule() -> None:
    metrics = Metrics()
    metrics.init_slot("standard")
    exported = metrics.render().decode()
    (metric,) = load("llm-service-hpa.yaml")["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert f"\n{name}{{" in exported
    (rule,) = load("prometheus-adapter-values.yaml")["rules"]["custom"]
    assert rule["seriesQuery"].startswith(name + "{") and rule["name"]["as"] == name
