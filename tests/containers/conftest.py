"""Fixtures of the image tests (`make test-containers`): the engine, the base images, the CPU image.

Every test here is marked `container` and left out of `make test`; they skip, saying why, where no
container engine can run. Their timings and the image's size are printed at the end of the run.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.containers import engine as containers

FACTS = pytest.StashKey[dict[str, object]]()
CPU_IMAGE = "llm-service:1.0.0-cpu"  # the tag DEPLOYMENT.md and docker-compose.cpu.yml use


def pytest_configure(config: pytest.Config) -> None:
    config.stash[FACTS] = {}


@pytest.fixture(scope="session")
def facts(pytestconfig: pytest.Config) -> dict[str, object]:
    return pytestconfig.stash[FACTS]


@pytest.fixture(scope="session")
def engine(facts: dict[str, object]) -> containers.Engine:
    try:
        found = containers.detect()
        started = time.monotonic()
        containers.ensure_image(found, containers.PYTHON_BASE, containers.BASES / "python.Containerfile")
        containers.usable(found, containers.PYTHON_BASE)
        containers.ensure_image(found, containers.REDIS_IMAGE, containers.BASES / "redis.Containerfile")
    except containers.EngineUnavailable as why:
        pytest.skip(str(why))
    facts["engine"] = found.name
    facts["notes"] = found.notes  # the same list: later notes show too
    facts["base images (s)"] = round(time.monotonic() - started, 1)
    return found


@pytest.fixture(scope="session")
def cpu_image(engine: containers.Engine, facts: dict[str, object]) -> Iterator[str]:
    """Dockerfile.cpu built as DEPLOYMENT.md says, with build arguments only (no edits for the test)."""
    started = time.monotonic()
    args = containers.build_arguments(engine, containers.torch_index())
    engine.run("build", *args, "-f", "Dockerfile.cpu", "-t", CPU_IMAGE, str(containers.REPO), timeout=3600)
    facts["build Dockerfile.cpu (s)"] = round(time.monotonic() - started, 1)
    facts.update({f"image {k}": v for k, v in containers.image_facts(engine, CPU_IMAGE).items()})
    yield CPU_IMAGE


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    facts = config.stash.get(FACTS, {})
    if facts:
        terminalreporter.section("container runs")
        for key, value in facts.items():
            terminalreporter.write_line(f"{key}: {value}")
