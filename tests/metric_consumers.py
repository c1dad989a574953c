"""Every metric the dashboard, the alert rules and the docs query, checked against a /metrics text.

The dashboard's and rules' PromQL is parsed with promql-parser; the docs' inline references are
parsed as PromQL when they are PromQL (`llm_model_loaded == 0`) and otherwise read in the docs'
own notation: `name{label,label}` (these labels exist), `name{label=a|b}` (these values).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import promql_parser
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from llm_service.api.accounting import REQUEST_STATUSES
from llm_service.observability.metrics import CACHE_OPERATIONS, Metrics

REPO = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "DEPLOYMENT.md", "QUICKSTART.md", "IMPLEMENTATION.md")
# Grafana's variables, replaced by something PromQL parses.
_GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m", "$model": ".*"}
_LABEL_VALUES = re.compile(r"label_values\(\s*(?P<metric>\w+)\s*,\s*(?P<label>\w+)\s*\)")
# llm_service is the package, not a metric.
_DOC_REFERENCE = re.compile(r"\b(?P<name>llm_(?!service\b)[a-z0-9_]+)(?:\{(?P<labels>[^}]*)\})?")
# Label values a metric can take beyond those a fresh service shows.
DECLARED = {
    ("llm_requests", "status"): set(REQUEST_STATUSES),
    ("llm_cache_errors", "operation"): set(CACHE_OPERATIONS),
}
_CODE = re.compile(r"```.*?```|`[^`\n]+`", re.DOTALL)


@dataclass
class Reference:
    """One metric as a consumer uses it: the labels it filters or groups on, and the values it expects."""

    source: str
    expression: str
    metric: str
    labels: set[str] = field(default_factory=set)
    values: dict[str, set[str]] = field(default_factory=dict)  # label -> values it must be able to take


def _grafana_expressions(path: Path) -> Iterator[tuple[str, str]]:
    dashboard = json.loads(path.read_text(encoding="utf-8"))

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield f"{path.name}: {panel.get('title')}", target["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        text = query.get("query") if isinstance(query, dict) else query
        if variable.get("type") == "query" and isinstance(text, str):
            yield f"{path.name}: ${variable['name']}", text


def _rule_expressions(path: Path) -> Iterator[tuple[str, str]]:
    for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
        if not isinstance(document, dict):
            continue
        for group in document.get("groups", []) or []:
            for rule in group.get("rules", []) or []:
                yield f"{path.name}: {rule.get('alert') or rule.get('record')}", str(rule["expr"])


def promql_references(source: str, expression: str) -> list[Reference]:
    """The metrics of one PromQL expression (Grafana variables allowed); ValueError if it does not parse."""
    grafana = _LABEL_VALUES.fullmatch(expression.strip())
    if grafana:
        return [Reference(source, expression, grafana["metric"], {grafana["label"]})]
    text = expression
    for variable, value in _GRAFANA_VARIABLES.items():
        text = text.replace(variable, value)
    tree = promql_parser.parse(text)
    references: list[Reference] = []

    def inner(node: Any) -> list[Reference]:
        found: list[Reference] = []

        def visit(child: Any) -> bool:
            if isinstance(child, promql_parser.VectorSelector) and child.name:
                ref = Reference(source, expression, child.name)
                for matcher in child.matchers.matchers:
                    ref.labels.add(matcher.name)
                    if matcher.op == promql_parser.MatchOp.Equal and matcher.value:
                        ref.values.setdefault(matcher.name, set()).add(matcher.value)
                found.append(ref)
            return True

        promql_parser.walk(node, visit)
        return found

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            references.extend(inner(node))
        grouping: list[str] = []
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            if node.modifier.type == promql_parser.AggModifierType.By:
                grouping = list(node.modifier.labels)
        if isinstance(node, promql_parser.BinaryExpr) and node.modifier and node.modifier.matching:
            if node.modifier.matching.type == promql_parser.LabelModifierType.Include:
                grouping = list(node.modifier.matching.labels)
        if grouping:
            # Grouping labels must exist on a metric under the node: one Reference per metric.
            for ref in inner(node):
                references.append(Reference(source, expression, ref.metric, {*grouping} - {"le"}))
        return True

    promql_parser.walk(tree, visit)
    return references


def doc_references(source: str, text: str) -> list[Reference]:
    """The metrics a doc's inline code and code blocks name, with their labels."""
    references = []
    for span in _CODE.findall(text):
        code = span.strip("`")
        if "llm_" not in code:
            continue
        try:
            parsed = promql_references(source, code)
        except ValueError:
            parsed = []
        if parsed:
            references.extend(parsed)
            continue
        for match in _DOC_REFERENCE.finditer(code):
            ref = Reference(source, match.group(0), match["name"])
            for item in filter(None, (part.strip() for part in (match["labels"] or "").split(","))):
                name, _, values = item.partition("=")
                name = name.strip().rstrip("!~")
                ref.labels.add(name)
                wanted = {v.strip().strip('"') for v in values.split("|") if v.strip()} if values else set()
                if wanted and "..." not in wanted and not item.startswith((f"{name}!=", f"{name}=~")):
                    ref.values[name] = wanted
            references.append(ref)
    return references


def all_references() -> list[Reference]:
    references: list[Reference] = []
    for path in sorted((REPO / "deploy" / "grafana").glob("*.json")):
        for source, expression in _grafana_expressions(path):
            references.extend(promql_references(source, expression))
    for path in sorted((REPO / "deploy").rglob("*.y*ml")):
        if "prometheus" in path.parts:
            for source, expression in _rule_expressions(path):
                references.extend(promql_references(source, expression))
    for doc in DOCS:
        references.extend(doc_references(doc, (REPO / doc).read_text(encoding="utf-8")))
    return references


def declared_labels(registry: CollectorRegistry) -> dict[str, frozenset[str]]:
    """Every name a collector of `registry` exposes (family and series) -> the label names it declares
    (a histogram's buckets also `le`). prometheus_client has no public accessor for them."""
    declared: dict[str, frozenset[str]] = {}
    for collector, names in registry._collector_to_names.items():
        labelnames = frozenset(getattr(collector, "_labelnames", ()))
        for name in names:
            declared[name] = labelnames | ({"le"} if name.endswith("_bucket") else frozenset())
    return declared


@dataclass
class Exposition:
    """The series of one /metrics text: sample name -> label names and values seen; and the metrics
    the text declares (HELP and TYPE) with no series yet, with the label names their collectors declare."""

    labels: dict[str, dict[str, set[str]]]
    unseen: dict[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, declared: dict[str, frozenset[str]] | None = None) -> Exposition:
        """`declared`: declared_labels of the service's collectors (by default a fresh Metrics', whose
        collectors and label names are the service's)."""
        if declared is None:
            declared = declared_labels(Metrics().registry)
        labels: dict[str, dict[str, set[str]]] = {}
        unseen: dict[str, frozenset[str]] = {}
        for family in text_string_to_metric_families(text):
            if not family.samples:
                # A labelled metric with no series yet (an embedding slot's, when none is configured)
                # exists if a collector of the service declares it; its labels are that collector's.
                suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ())
                for key in (family.name, *(family.name + suffix for suffix in suffixes)):
                    if key in declared:
                        unseen[key] = declared[key]
            for sample in family.samples:
                # A histogram is named by its family in the docs, by its series in queries.
                for key in {sample.name, family.name}:
                    seen = labels.setdefault(key, {})
                    for name, value in sample.labels.items():
                        seen.setdefault(name, set()).add(value)
        return cls(labels, unseen)

    def problems(self, ref: Reference, declared: dict[tuple[str, str], set[str]]) -> list[str]:
        """What `ref` uses that this exposition lacks; `declared` holds the label values a metric
        can take beyond those it shows now (a status no request has had yet)."""
        where = f"{ref.source}: {ref.expression!r}"
        have = self.labels.get(ref.metric)
        if have is not None:
            names = set(have)
        elif ref.metric in self.unseen:  # declared, no series yet: its collector's labels, no values seen
            have, names = {}, set(self.unseen[ref.metric])
        else:
            return [f"{where}: no metric {ref.metric} in /metrics"]
        found = [f"{where}: {ref.metric} has no label {label!r}" for label in sorted(ref.labels - names)]
        family = re.sub(r"_(total|bucket|sum|count|created)$", "", ref.metric)
        for label, values in ref.values.items():
            possible = have.get(label, set()) | declared.get((family, label), set())
            found += [f"{where}: {ref.metric}{{{label}={v!r}}} never exists" for v in sorted(values - possible)]
        return found
