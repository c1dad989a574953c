"""Suite-wide: how `make test` spreads the tests over its workers (pytest-xdist, `--dist loadgroup`).

A module's tests stay on one worker, so that a module's own server starts once; the tests on each
shared service (the `service` fixture, the `retrieval_service` fixture, `faulty_slots_service`) form
one group, so that each shared server starts on one worker only and no other test's traffic reaches it.
vLLM's CPU build binds an engine's threads to core 0 unless told otherwise:
each worker's engines get a core of their own.

The groups come from each test's fixtures, which only the workers see (they collect; the controller
that schedules does not). xdist's own `loadgroup` cannot carry them under pytest 9 (it renames
`item._nodeid`, which pytest 9 no longer reads), so the workers write the groups to a file and the
scheduler below reads it: workers finish collecting before anything is scheduled. Tests marked
`long(seconds)` (a minute or more) are handed out first, longest first.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

SHARED = ("service", "retrieval_service", "faulty_slots_service")  # a test on two is grouped by the first
GROUPS_FILE = "LLM_TEST_GROUPS_FILE"  # set by the controller, inherited by its workers


def group_of(item: pytest.Item) -> str:
    names = set(getattr(item, "fixturenames", ()))
    for shared in SHARED:
        if shared in names:
            return shared
    return item.nodeid.split("::")[0]


def pytest_configure(config: pytest.Config) -> None:
    if getattr(config.option, "dist", "no") == "loadgroup" and not hasattr(config, "workerinput"):
        os.environ[GROUPS_FILE] = str(Path(tempfile.mkdtemp(prefix="test-groups-")) / "groups.json")


def pytest_unconfigure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput") and (path := os.environ.pop(GROUPS_FILE, None)):
        shutil.rmtree(Path(path).parent, ignore_errors=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # xdist hands out tests by node id: two tests with one id would run once (schemathesis'
    # `schema.parametrize()` did that to 18 operations). Refuse such a collection in every run.
    if twice := sorted(nodeid for nodeid, count in Counter(item.nodeid for item in items).items() if count > 1):
        raise pytest.UsageError(f"tests share a node id, so make test would run them once: {twice[:5]}")
    path, worker = os.environ.get(GROUPS_FILE), os.environ.get("PYTEST_XDIST_WORKER")
    if not (path and worker):
        return
    groups = {item.nodeid: group_of(item) for item in items}
    # The order work is handed out in: groups holding a `long(seconds)` test first, longest first (a
    # worker that starts one last idles the other at the end), then the larger groups. Every worker
    # sorts the same way, so the collections (whose indexes the controller sends) stay identical.
    seconds: dict[str, float] = {}
    sizes: dict[str, int] = {}
    for item in items:
        group = groups[item.nodeid]
        sizes[group] = sizes.get(group, 0) + 1
        if marker := item.get_closest_marker("long"):
            seconds[group] = max(seconds.get(group, 0.0), float(marker.args[0]))
    first = {group: index for index, group in reversed(list(enumerate(groups.values())))}
    items.sort(key=lambda item: (-seconds.get(groups[item.nodeid], 0.0), -sizes[groups[item.nodeid]],
                                 first[groups[item.nodeid]]))
    partial = Path(f"{path}.{worker}")
    partial.write_text(json.dumps(groups))
    partial.replace(path)  # every worker collects the same tests: any complete file will do


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if getattr(config.option, "dist", "no") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):  # type: ignore[misc]
        """Load-scope scheduling whose scope is the group the workers wrote (largest groups first)."""

        groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:
                self.groups = json.loads(Path(os.environ[GROUPS_FILE]).read_text())
            return self.groups.get(nodeid) or nodeid.split("::")[0]

    config.option.loadscopereorder = False  # the workers ordered the collection already
    return GroupScheduling(config, log)


def worker_core() -> int | None:
    """The core this xdist worker's engines run on (None outside xdist or on one core)."""
    worker, cores = os.environ.get("PYTEST_XDIST_WORKER", ""), os.cpu_count() or 1
    if not worker.startswith("gw") or cores < 2:
        return None
    return int(worker[2:]) % cores


if (core := worker_core()) is not None:  # inherited by every server a test starts
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(core))
