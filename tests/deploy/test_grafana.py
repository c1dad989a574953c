"""The Grafana dashboard is valid JSON over the service's documented metric names only."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from llm_service.observability.metrics import Metrics
from tests.deploy.conftest import REPO

DASHBOARD = REPO / "deploy" / "grafana" / "llm-service-dashboard.json"
# The metric names promised to users (deployment guide and project brief).
COUNTERS = {
    "llm_requests_total", "llm_tokens_generated_total", "llm_prompt_tokens_total",
    "llm_model_evictions_total", "llm_cache_hits_total", "llm_cache_misses_total", "llm_cache_errors_total",
}  # fmt: skip
GAUGES = {"llm_model_loaded", "llm_requests_in_flight"}
HISTOGRAMS = {
    "llm_inference_duration_seconds",
    "llm_time_to_first_token_seconds",
    "llm_model_load_duration_seconds",
}
SERIES = COUNTERS | GAUGES | {f"{h}_{suffix}" for h in HISTOGRAMS for suffix in ("bucket", "sum", "count")}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def expressions(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_panels_are_well_formed(dashboard: dict[str, Any]) -> None:
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
    assert {variable["name"] for variable in dashboard["templating"]["list"]} == {"datasource", "model"}


def test_queries_use_only_documented_metrics(dashboard: dict[str, Any]) -> None:
    used = {name for expr in expressions(dashboard) for name in re.findall(r"\bllm_[a-z_]+", expr)}
    assert used <= SERIES, sorted(used - SERIES)


def exposed_series() -> set[str]:
    """Series names the service's own collectors expose."""
    names = set()
    for family in Metrics().registry.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count"))
        else:
            names.add(family.name)
    return names


def test_queries_match_the_services_collectors(dashboard: dict[str, Any]) -> None:
    used = {name for expr in expressions(dashboard) for name in re.findall(r"\bllm_[a-z_]+", expr)}
    assert used <= exposed_series(), sorted(used - exposed_series())


def test_covers_requests_errors_tokens_latency_models_and_cache(dashboard: dict[str, Any]) -> None:
    exprs = "\n".join(expressions(dashboard))
    assert 'status!="success"' in exprs  # errors
    assert "rate(llm_tokens_generated_total" in exprs  # tokens/s
    for histogram in ("llm_time_to_first_token_seconds", "llm_inference_duration_seconds"):
        for quantile in ("0.5", "0.95", "0.99"):
            assert f"histogram_quantile({quantile}, sum by (le, model) (rate({histogram}_bucket" in exprs
    assert "llm_model_loaded" in exprs
    assert "llm_cache_hits_total" in exprs and "llm_cache_misses_total" in exprs
