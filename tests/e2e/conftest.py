"""End-to-end fixtures: a real redis-server and the real service (vLLM on the demo model)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from llm_service.config.settings import DEMO_EMBEDDING_DIR, DEMO_MODEL_DIR, DEMO_MULTIMODAL_DIR
from tests.conftest import worker_core

from .otlp_receiver import OTLPReceiver, otlp_receiver  # noqa: F401 (a session fixture)

ROOT = Path(__file__).resolve().parents[2]
KV_CACHE_ARGS = '{"kv_cache_memory_bytes": 536870912}'  # 512 MiB per engine
# The retrieval slots' encoder keeps no KV cache: it runs max_num_seqs inputs at once, so a small
# batch lets the admission tests fill it with a request the fixture's limits allow.
RETRIEVAL_ENGINE_ARGS = '{"max_num_seqs": 8}'
READY_TIMEOUT = 600.0  # seconds; an engine starts in about 30 s here, under load slower


def other_core() -> str:
    """A core other than the one this process's engines run on by default (tests/conftest.py)."""
    cores = os.cpu_count() or 1
    if cores < 2:
        return "auto"
    return str(((worker_core() or 0) + 1) % cores)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


class RedisServer:
    """A throwaway redis-server on a free port; stop() and start() for fault tests."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (make setup installs it)")
        self.binary = binary
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=self.workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self.ping, 10, "redis-server")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None


class ServiceProcess:
    """`python -m llm_service` in a subprocess, on a free port, logs to a file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **env, "APP_PORT": str(self.port), "APP_HOST": "127.0.0.1"}
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, ready: bool = True) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llm_service"],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        if ready:
            self.wait("/health/ready")

    def wait(self, path: str, timeout: float = READY_TIMEOUT) -> None:
        def answered() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited ({self.process.returncode}):\n{self.log_tail()}")
            try:
                return httpx.get(self.base_url + path, timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_for(answered, timeout, f"{path} of the service")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.log_tail()}") from None

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.process = None


def demo_model_path(folder: Path = DEMO_MODEL_DIR) -> str:
    path = (ROOT / folder).resolve()
    if not (path / "config.json").exists():
        pytest.fail(
            f"demo model missing at {path}: run `python -m llm_service.tools.demo_model --multimodal` "
            "and `--embedding` (make setup)"
        )
    return str(path)


def base_env(**overrides: str) -> dict[str, str]:
    """Settings every e2e service shares: the demo models (as `make serve` has them), on the CPU."""
    model = demo_model_path()
    env = {
        "APP_ENV": "test",
        "APP_LOG_LEVEL": "INFO",
        "LLM_DEVICE": "cpu",
        "LLM_MODEL_STANDARD": model,
        "LLM_MODEL_LONGCTX": model,
        "LLM_MODEL_MULTIMODAL": demo_model_path(DEMO_MULTIMODAL_DIR),
        "LLM_MAX_MODEL_LEN_STANDARD": "2048",
        "LLM_MAX_MODEL_LEN_LONGCTX": "4096",
        "LLM_MAX_MODEL_LEN_MULTIMODAL": "1024",
        # On the CPU a share is a fraction of NUMA node 0, whose size varies between machines
        # (and, on these VMs, over time): small shares plus a fixed KV cache per engine keep
        # the tests' memory use the same everywhere.
        "LLM_MEMORY_SHARE_STANDARD": "0.15",
        "LLM_MEMORY_SHARE_LONGCTX": "0.15",
        "LLM_MEMORY_SHARE_MULTIMODAL": "0.15",
        "LLM_ENGINE_ARGS_STANDARD": KV_CACHE_ARGS,
        "LLM_ENGINE_ARGS_LONGCTX": KV_CACHE_ARGS,
        "LLM_ENGINE_ARGS_MULTIMODAL": KV_CACHE_ARGS,
        "LLM_GPU_MEMORY_UTILIZATION": "0.45",
        "LLM_PRELOAD_MODELS": "standard",
        "LLM_IDLE_UNLOAD_SECONDS": "0",
        "LLM_LOAD_WAIT_SECONDS": "300",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.update(overrides)
    return env


def embedding_env() -> dict[str, str]:
    """The demo embedding slot (all-MiniLM-L6-v2 on vLLM's pooling runner), as `make serve` has it;
    its context is the model's own (256 tokens, sentence-transformers' max_seq_length)."""
    return {
        "LLM_MODEL_EMBEDDING": demo_model_path(DEMO_EMBEDDING_DIR),
        "LLM_MEMORY_SHARE_EMBEDDING": "0.1",
        "LLM_ENGINE_ARGS_EMBEDDING": RETRIEVAL_ENGINE_ARGS,
    }


def rerank_env() -> dict[str, str]:
    """The demo rerank slot (all-MiniLM-L6-v2 as a bi-encoder: cosine scores), as `make serve` has it."""
    return {
        "LLM_MODEL_RERANK": demo_model_path(DEMO_EMBEDDING_DIR),
        "LLM_MEMORY_SHARE_RERANK": "0.1",
        "LLM_ENGINE_ARGS_RERANK": RETRIEVAL_ENGINE_ARGS,
    }


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def service_env(
    redis_server: RedisServer,
    otlp_receiver: OTLPReceiver,  # noqa: F811 (the fixture imported above)
) -> dict[str, str]:
    """The shared service's environment; fixtures of other suites may add to it.
    It caches in `redis_server` and traces to `otlp_receiver` (a local Langfuse stand-in)."""
    redis_env = {"REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(redis_server.port)}
    return base_env(**redis_env, **otlp_receiver.service_env())


def retrieval_env(redis_server: RedisServer) -> dict[str, str]:
    """The retrieval service's environment: only the retrieval slots loaded (embedding and rerank on
    the demo models). Its engines run on the other core than the shared service's: vLLM's CPU build
    binds every engine's worker to one core, so the two shared services start side by side instead of
    in turn."""
    return base_env(
        **embedding_env(),
        **rerank_env(),
        REDIS_HOST="127.0.0.1",
        REDIS_PORT=str(redis_server.port),
        LLM_PRELOAD_MODELS="embedding,rerank",
        LLM_EMBEDDING_MAX_INPUTS="128",
        LLM_RERANK_MAX_DOCUMENTS="64",
        VLLM_CPU_OMP_THREADS_BIND=other_core(),
    )


class SharedServices:
    """The session's shared services, each started once: side by side at the session's start when one
    process runs every test, on first use under make test's workers (tests/conftest.py gives each
    shared service's tests a worker of their own, and no worker should start one it never uses)."""

    def __init__(self, envs: dict[str, Callable[[], dict[str, str]]], tmp: pytest.TempPathFactory) -> None:
        self.envs = envs
        self.tmp = tmp
        self.started: dict[str, ServiceProcess] = {}

    def start(self, name: str) -> ServiceProcess:
        if name not in self.started:
            proc = ServiceProcess(self.envs[name](), self.tmp.mktemp(name) / "service.log")
            proc.start(ready=False)
            self.started[name] = proc
        return self.started[name]

    def ready(self, name: str) -> ServiceProcess:
        proc = self.start(name)
        proc.wait("/health/ready")
        return proc

    def stop(self) -> None:
        for proc in self.started.values():
            proc.stop()


@pytest.fixture(scope="session")
def shared_services(
    request: pytest.FixtureRequest,
    service_env: dict[str, str],
    redis_server: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SharedServices]:
    """The shared services (each fixture below waits for its own readiness). A service added here
    starts with the others."""
    services = SharedServices(
        {"service": lambda: service_env, "retrieval_service": lambda: retrieval_env(redis_server)}, tmp_path_factory
    )
    try:
        if not os.environ.get("PYTEST_XDIST_WORKER"):
            items = request.session.items
            for name in sorted(n for n in services.envs if any(n in getattr(i, "fixturenames", ()) for i in items)):
                services.start(name)
        yield services
    finally:
        services.stop()


@pytest.fixture(scope="session")
def service(shared_services: SharedServices) -> ServiceProcess:
    """The shared real service: standard preloaded, longctx and multimodal lazy."""
    return shared_services.ready("service")


@pytest.fixture(scope="session")
def retrieval_service(shared_services: SharedServices) -> ServiceProcess:
    """A service with only the retrieval slots loaded (embedding and rerank on the demo models),
    shared by the embeddings, rerank and docs tests: two engine starts per session, not per suite."""
    return shared_services.ready("retrieval_service")


@pytest.fixture(scope="session")
def faulty_slots_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """A service for fault tests, shared by their modules (and stopped after its last test):
    standard preloaded, no cache, a failed slot loaded again after 5 s, and a multimodal slot whose
    share (0.9) is more than the whole budget (0.45), so it can never load."""
    env = base_env(LLM_LOAD_RETRY_SECONDS="5", LLM_CACHE_ENABLED="false", LLM_MEMORY_SHARE_MULTIMODAL="0.9")
    proc = ServiceProcess(env, tmp_path_factory.mktemp("faulty") / "service.log")
    proc.start()
    yield proc
    proc.stop()


# Session servers that are stopped right after the last test that uses them (by the order of the
# collected tests), not at the end of the session: they are shared between modules but hold an
# engine's memory only while needed. Each is a fixture yielding a ServiceProcess.
STOPPED_AFTER_LAST_USE = ("faulty_slots_service",)
_LAST_USERS = pytest.StashKey[dict[str, str]]()


def pytest_collection_finish(session: pytest.Session) -> None:
    last = {}
    for item in session.items:  # in the order they run: the last user of each server wins
        last |= {name: item.nodeid for name in STOPPED_AFTER_LAST_USE if name in getattr(item, "fixturenames", ())}
    session.config.stash[_LAST_USERS] = last


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    for name, nodeid in item.config.stash.get(_LAST_USERS, {}).items():
        server = getattr(item, "funcargs", {}).get(name)
        if nodeid == item.nodeid and isinstance(server, ServiceProcess):
            server.stop()


@pytest.fixture(scope="session")
def client(service: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.base_url, timeout=300) as http:
        yield http


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.path):
            item.add_marker(pytest.mark.e2e)
