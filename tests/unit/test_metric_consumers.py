"""The dashboard's, the rules' and the docs' metric queries against the service's /metrics."""

from __future__ import annotations

import pytest

from tests.metric_consumers import DECLARED, Exposition, Reference, all_references, doc_references, promql_references

REFERENCES = all_references()


@pytest.fixture
async def exposition(fake_app) -> Exposition:
    client, _ = fake_app
    await client.post("/generate", json={"prompt": "hello there"})
    return Exposition.parse((await client.get("/metrics")).text)


def test_the_dashboard_and_the_docs_are_read() -> None:
    sources = {ref.source.split(":")[0] for ref in REFERENCES}
    assert {"llm-service-dashboard.json", "README.md", "DEPLOYMENT.md", "QUICKSTART.md"} <= sources
    assert any(ref.metric == "llm_cache_errors_total" and "model" in ref.labels for ref in REFERENCES)


async def test_each_query_matches_the_metrics(exposition: Exposition) -> None:
    problems = [problem for ref in REFERENCES for problem in exposition.problems(ref, DECLARED)]
    assert not problems, "\n".join(problems)


async def test_every_metric_is_labelled_by_model(exposition: Exposition) -> None:
    unlabelled = [name for name, labels in exposition.labels.items() if "model" not in labels]
    assert not unlabelled


def test_the_checker_catches_a_missing_label_and_value() -> None:
    text = 'llm_cache_errors_total{operation="get"} 1.0\n'
    exposition = Exposition.parse(text)
    (ref,) = promql_references("x", 'sum(rate(llm_cache_errors_total{model=~"$model"}[$__rate_interval]))')
    assert exposition.problems(ref, {}) == [
        "x: 'sum(rate(llm_cache_errors_total{model=~\"$model\"}[$__rate_interval]))': "
        "llm_cache_errors_total has no label 'model'"
    ]
    (grouped,) = [r for r in promql_references("x", "sum by (slot) (llm_cache_errors_total)") if r.labels]
    assert grouped.labels == {"slot"} and exposition.problems(grouped, {})
    (doc,) = doc_references("d", "see `llm_cache_errors_total{operation=get|flush}`")
    assert exposition.problems(doc, {}) == ["d: 'llm_cache_errors_total{operation=get|flush}': "
                                            "llm_cache_errors_total{operation='flush'} never exists"]
    assert exposition.problems(Reference("d", "llm_nope", "llm_nope"), {})
