"""The soak harness in its short form on the real service: the sampler reads every figure, the mixed
traffic gets every kind of answer, and the service stays healthy. No figure is judged for time or slope."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, demo_model_path

pytestmark = pytest.mark.long(100)  # about 100 s here: started early by make test's workers (tests/conftest.py)


def test_soak_short_form_samples_every_figure_and_stays_healthy(tmp_path: Path) -> None:
    demo_model_path()
    plot = tmp_path / "soak.png"
    done = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--minutes", "1", "--interval", "3", "--swap-every", "0",
         "--results", str(tmp_path), "--plot", str(plot)],
        cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = list(csv.DictReader((tmp_path / "samples.csv").open()))
    assert len(rows) == summary["samples"] >= 10
    for row in rows:
        assert row["live"] == "200", row
        assert float(row["rss_mib"]) > float(row["api_rss_mib"]) > 0, row  # the engine's processes counted
        assert int(row["processes"]) >= 2 and int(row["fds"]) > 0, row
        assert int(row["tasks"]) > 0 and int(row["redis_clients"]) >= 1, row
        assert 0.0 <= float(row["kv_usage"]) <= 1.0, row
    assert any(float(row["kv_usage"]) > 0 for row in rows)  # the engine's own figure, read while it ran
    responses = summary["responses"]
    for kind in ("chat:200", "cached:hit", "stream:200", "disconnect:disconnect", "burst:429", "malformed:400"):
        assert responses.get(kind, 0) > 0, (kind, responses)
    # No 5xx and no client error (a timeout, a dropped connection): only the answers the mix asks for.
    assert {key.split(":")[1] for key in responses} <= {"200", "hit", "disconnect", "429", "400"}, responses
    assert set(summary["slopes"]) == {"rss_mib", "api_rss_mib", "fds", "tasks", "redis_clients", "kv_usage"}
    assert plot.stat().st_size > 0
