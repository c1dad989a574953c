"""Reading samples out of Prometheus text, for tests."""

from __future__ import annotations


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the series of `name` whose labels include `labels` (as PromQL's sum), 0 when none."""
    want = {f'{k}="{v}"' for k, v in labels.items()}
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or (not labels and line.startswith(name + " ")):
            series, value = line.rsplit(" ", 1)
            have = set(series[len(name) + 1 : -1].split(",")) if "{" in series else set()
            if want <= have:
                total += float(value)
    return total
