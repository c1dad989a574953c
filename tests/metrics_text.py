"""Reading one sample out of Prometheus text, for tests."""

from __future__ import annotations


def metric(text: str, name: str, **labels: str) -> float:
    """The value of the series `name{labels}` (exact label set), 0 when absent."""
    want = sorted(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + "{"):
            series, value = line.rsplit(" ", 1)
            if sorted(series[len(name) + 1 : -1].split(",")) == want:
                return float(value)
    return 0.0
