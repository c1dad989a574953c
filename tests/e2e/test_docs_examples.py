"""Every README and QUICKSTART example that talks to the service, run as written against the real
one (vLLM on the demo model, a real redis-server), localhost:8002 rewritten to its port.

Which blocks run and how their output is checked: tests/docs_blocks.py. Blocks marked
`docs-test: skip` are reported as skipped with their reason; none is left out silently.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.docs_blocks import SERVICE_ADDRESS, Block, all_blocks
from tests.metric_consumers import DECLARED, Exposition, all_references
from tests.metrics_text import metric

from .conftest import ServiceProcess

# What the docs test's service offers to blocks that declare `docs-test: needs X` (besides three
# text slots on the demo model). Add a capability here once the service fixture has it.
PROVIDED = frozenset({"cache"})
# Capabilities of the retrieval service (tests/e2e/conftest.py), which the blocks that need them
# run against: the session's embedding and rerank tests start it anyway.
RETRIEVAL = frozenset({"embedding", "rerank"})
# Only a way out of a hung block, never a measure of speed.
HANG_GUARD_SECONDS = 1800
# Every curl of a block fails on an HTTP error status, showing the body.
BASH_PRELUDE = 'set -euo pipefail\ncurl() { command curl --fail-with-body --show-error "$@"; }\n'
CHAT = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0,
        "max_tokens": 16}

BLOCKS = [b for b in all_blocks() if (b.runnable and (b.talks_to_service or b.skip_reason)) or b.mark("response-of")]


def rewritten(code: str, base_url: str) -> str:
    return SERVICE_ADDRESS.sub(base_url, code)


def run_block(block: Block, base_url: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    code = rewritten(block.code, base_url)
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    if block.lang == "python":
        script = workdir / f"{block.doc.replace('.', '_')}_{block.line}.py"
        script.write_text(code, encoding="utf-8")
        command = [sys.executable, str(script)]
    else:
        command = ["bash", "-c", BASH_PRELUDE + code]
    return subprocess.run(
        command, cwd=workdir, env=env, capture_output=True, text=True, timeout=HANG_GUARD_SECONDS
    )


def key_tree(value: Any) -> Any:
    """The field names of a JSON value, nested: what a doc's shown response promises."""
    if isinstance(value, dict):
        return {k: key_tree(v) for k, v in value.items()}
    return None


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.id)
def test_docs_example(block: Block, request: pytest.FixtureRequest, client: httpx.Client, tmp_path: Path) -> None:
    if block.skip_reason:
        pytest.skip(f"{block.id}: {block.skip_reason}")
    needs = set(block.mark("needs"))
    missing = sorted(needs - PROVIDED - RETRIEVAL)
    if missing:
        pytest.skip(f"{block.id}: needs {', '.join(missing)}, which the docs test service does not provide")
    for endpoint in block.mark("response-of"):
        shown = json.loads(block.code)
        actual = client.post(endpoint, json=CHAT)
        assert actual.status_code == 200, actual.text
        assert key_tree(shown) == key_tree(actual.json()), f"{block.id}: the fields shown differ from {endpoint}'s"
        return
    # Only the blocks that need a retrieval slot start (or share) the retrieval service.
    target: ServiceProcess = request.getfixturevalue("retrieval_service" if needs & RETRIEVAL else "service")
    result = run_block(block, target.base_url, tmp_path)
    output = result.stdout
    assert result.returncode == 0, f"{block.id} failed ({result.returncode}):\n{output}\n{result.stderr}"
    assert output.strip(), f"{block.id} printed nothing"
    for text in block.mark("output-contains"):
        assert text in output, f"{block.id}: {text!r} not in its output:\n{output}"
    if block.lang == "python":
        assert not re.search(r"\bNone\b", output), f"{block.id} printed None:\n{output}"


def test_dashboard_and_docs_queries_match_the_live_metrics(client: httpx.Client) -> None:
    client.post("/generate", json=CHAT)
    exposition = Exposition.parse(client.get("/metrics").text)
    problems = [problem for ref in all_references() for problem in exposition.problems(ref, DECLARED)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("body", "status", "labels"),
    [
        (CHAT, 200, {"model": "standard", "status": "success"}),
        ({**CHAT, "temperature": 9}, 400, {"model": "unknown", "status": "invalid"}),
        ({**CHAT, "max_tokens": 10**6}, 400, {"model": "standard", "status": "invalid"}),
        ({**CHAT, "model": "no-such-slot"}, 404, {"model": "unknown", "status": "not_found"}),
    ],
)
def test_the_live_request_counter_moves_for_each_status(
    client: httpx.Client, body: dict[str, Any], status: int, labels: dict[str, str]
) -> None:
    def count() -> float:
        return metric(client.get("/metrics").text, "llm_requests_total", **labels, code=str(status))

    before = count()
    r = client.post("/generate", json=body)
    assert r.status_code == status and "x-cache" in r.headers, r.text
    assert count() == before + 1
