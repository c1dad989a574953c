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


# Figures of the API process itself, which no slot owns: ours, and prometheus_client's standard
# process, garbage collector and platform collectors (process_*, python_*).
PROCESS_WIDE = {
    "llm_event_loop_tasks",
    "process_resident_memory_bytes",
    "process_open_fds",
    "python_gc_collections_total",
}
STANDARD = ("process_", "python_")


async def test_every_metric_is_labelled_by_model(exposition: Exposition) -> None:
    unlabelled = [name for name, labels in exposition.labels.items() if "model" not in labels]
    unlabelled += [name for name, labels in exposition.unseen.items() if "model" not in labels]
    assert {name for name in unlabelled if not name.startswith(STANDARD)} <= PROCESS_WIDE, unlabelled
    assert set(exposition.labels) >= PROCESS_WIDE  # each of them is exported


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


def test_a_metric_with_no_series_has_its_collectors_labels_only() -> None:
    declared = {name: frozenset({"model", "operation"}) for name in ("llm_cache_errors", "llm_cache_errors_total")}
    text = "# HELP llm_cache_errors_total Errors.\n# TYPE llm_cache_errors_total counter\n"
    exposition = Exposition.parse(text, declared)
    assert exposition.labels == {} and set(exposition.unseen) == set(declared)
    refs = promql_references("x", 'sum by (operation) (llm_cache_errors_total{model=~"$model"})')
    assert sorted(sorted(r.labels) for r in refs) == [["model"], ["operation"]]
    assert [problem for ref in refs for problem in exposition.problems(ref, {})] == []
    (slot,) = [r for r in promql_references("x", "sum by (slot) (llm_cache_errors_total)") if r.labels]
    assert exposition.problems(slot, {}) == ["x: 'sum by (slot) (llm_cache_errors_total)': "
                                             "llm_cache_errors_total has no label 'slot'"]
    (doc,) = doc_references("d", "see `llm_cache_errors_total{operation=get}`")
    assert exposition.problems(doc, {}) == ["d: 'llm_cache_errors_total{operation=get}': "
                                            "llm_cache_errors_total{operation='get'} never exists"]
    assert exposition.problems(doc, {("llm_cache_errors", "operation"): {"get"}}) == []
    # Declared by the text's HELP and TYPE but by no collector of the service: it does not exist.
    bare = Reference("d", "llm_cache_errors_total", "llm_cache_errors_total")
    assert Exposition.parse(text, {}).problems(bare, {}) == [
        "d: 'llm_cache_errors_total': no metric llm_cache_errors_total in /metrics"
    ]
