"""The registry under the deterministic simulator (registry_sim.py): seeded schedules, invariants after every step.

`SIM_SCHEDULES=N` runs N schedules (default 1000); `SIM_SEED=S` replays one.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from llm_service.registry import lifecycle, memory, reconciler

from .registry_sim import run_schedule


class _Quiet:
    """Drops log lines: thousands of schedules log hundreds of thousands of them."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


@pytest.fixture(autouse=True)
def quiet_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in (lifecycle, memory, reconciler):
        monkeypatch.setattr(module, "log", _Quiet())


def test_seeded_schedules_keep_every_invariant() -> None:
    if "SIM_SEED" in os.environ:
        seeds = [int(os.environ["SIM_SEED"])]
    else:
        seeds = list(range(int(os.environ.get("SIM_SCHEDULES", "1000"))))
    for seed in seeds:
        run_schedule(seed)


def test_a_schedule_replays_exactly() -> None:
    assert run_schedule(7).trace == run_schedule(7).trace
