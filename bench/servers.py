"""The processes under test: started one at a time, waited for, sampled for peak RSS, stopped."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.plan import DTYPE, KV_CACHE_BYTES, MAX_MODEL_LEN, MEMORY_SHARE, MODEL, ROOT

READY_TIMEOUT = 900.0
MIB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PeakRSS:
    """Samples the resident memory of a process and all its descendants in a thread; keeps the
    peak of each process (by pid) and of their sum."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.pid = pid
        self.interval = interval
        self.per_process: dict[int, tuple[str, int]] = {}
        self.total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> PeakRSS:
        self._thread.start()
        return self

    def _sample(self) -> None:
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        total = 0
        for proc in procs:
            try:
                rss = proc.memory_info().rss
                name = proc.name()
            except psutil.Error:
                continue
            total += rss
            if rss > self.per_process.get(proc.pid, ("", 0))[1]:
                self.per_process[proc.pid] = (name, rss)
        self.total = max(self.total, total)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(5)
        return self.summary()

    def summary(self) -> dict[str, Any]:
        processes = sorted(self.per_process.values(), key=lambda item: -item[1])
        return {
            "total_mib": round(self.total / MIB),
            "processes": [{"name": name, "peak_mib": round(rss / MIB)} for name, rss in processes],
        }


class Process:
    """A server process: its log, its readiness, its peak RSS, a clean stop."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.cmd = cmd
        self.env = {**os.environ, **env}
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.rss: PeakRSS | None = None
        self.started_in: float | None = None

    def start(self, ready: Callable[[], bool] | None = None, timeout: float = READY_TIMEOUT) -> Process:
        began = time.perf_counter()
        self.proc = subprocess.Popen(
            self.cmd, cwd=ROOT, env=self.env, stdout=self.log_path.open("ab"), stderr=subprocess.STDOUT
        )
        self.rss = PeakRSS(self.proc.pid).start()
        if ready is not None:
            self.wait(ready, timeout)
            self.started_in = time.perf_counter() - began
        return self

    def wait(self, ready: Callable[[], bool], timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); see {self.log_path}")
            try:
                if ready():
                    return
            except (httpx.HTTPError, OSError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f} s; see {self.log_path}")

    def stop(self) -> dict[str, Any]:
        """SIGTERM (then SIGKILL after 60 s); the peak RSS of the run."""
        summary = self.rss.stop() if self.rss is not None else {}
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        return summary


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of one process (all its threads, not its children)."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


class Spy:
    """py-spy recording one process from construction until stop() (raw stacks)."""

    def __init__(self, pid: int, path: Path, rate: int = 200) -> None:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        cmd = [spy, "record", "--pid", str(pid), "--format", "raw", "--output", str(path), "--rate", str(rate)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)  # attached before the measured work starts

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(60)


def http_ok(url: str) -> Callable[[], bool]:
    return lambda: httpx.get(url, timeout=2).status_code == 200


class Redis(Process):
    def __init__(self, log_dir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (make setup installs it)")
        self.port = free_port()
        cmd = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        super().__init__("redis", cmd, {}, log_dir)

    def ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")

    def launch(self) -> Redis:
        self.start(self.ping, 15)
        return self


def engine_args() -> dict[str, Any]:
    """vLLM engine arguments of every engine in the run (ours adds disable_log_stats itself)."""
    return {
        "model": str(MODEL),
        "max_model_len": MAX_MODEL_LEN,
        "gpu_memory_utilization": MEMORY_SHARE,
        "kv_cache_memory_bytes": KV_CACHE_BYTES,
        "enforce_eager": True,
        "dtype": DTYPE,
        # Every run sends prompts an earlier run (or warm-up) sent: cached prefixes would turn
        # TTFT into a cache lookup, differently per target.
        "enable_prefix_caching": False,
        "disable_log_stats": True,
    }


def common_env() -> dict[str, str]:
    return {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_CONFIGURE_LOGGING": "1"}


def vllm_serve(log_dir: Path) -> tuple[Process, str]:
    """`python -m vllm.entrypoints.openai.api_server` with the run's engine arguments."""
    port = free_port()
    args = engine_args()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", args["model"], "--served-model-name", "standard", "longctx",
        "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", str(args["max_model_len"]),
        "--gpu-memory-utilization", str(args["gpu_memory_utilization"]),
        "--kv-cache-memory-bytes", str(args["kv_cache_memory_bytes"]), "--dtype", args["dtype"],
        "--no-enable-prefix-caching",
        "--enforce-eager", "--disable-log-stats", "--disable-uvicorn-access-log",
    ]  # fmt: skip
    return Process("vllm-serve", cmd, common_env(), log_dir), f"http://127.0.0.1:{port}"


def service_env(
    port: int,
    redis_port: int | None,
    preload: str,
    budget: float,
    cache: bool,
    **extra: str,
) -> dict[str, str]:
    """Settings of ours: the demo model in every slot with the run's engine arguments."""
    kv = json.dumps({"kv_cache_memory_bytes": KV_CACHE_BYTES, "dtype": DTYPE, "enable_prefix_caching": False})
    env = {
        **common_env(),
        "APP_ENV": "production",
        "APP_LOG_LEVEL": "WARNING",
        "APP_HOST": "127.0.0.1",
        "APP_PORT": str(port),
        "LLM_DEVICE": "cpu",
        "LLM_GPU_MEMORY_UTILIZATION": str(budget),
        "LLM_PRELOAD_MODELS": preload,
        "LLM_LOAD_ON_STARTUP": "true" if preload else "false",
        "LLM_IDLE_UNLOAD_SECONDS": "0",
        "LLM_LOAD_WAIT_SECONDS": "600",
        "LLM_EVICTION_WAIT_SECONDS": "60",
        "LLM_CACHE_ENABLED": "true" if cache else "false",
        # Admission on its defaults: ours admits by work (what the engine holds at once, then what
        # drains before each request's deadline), so the queued workloads run as on `vllm serve`.
    }
    for slot in ("standard", "longctx", "multimodal"):
        env[f"LLM_MODEL_{slot.upper()}"] = str(MODEL)
        env[f"LLM_MAX_MODEL_LEN_{slot.upper()}"] = str(MAX_MODEL_LEN)
        env[f"LLM_MEMORY_SHARE_{slot.upper()}"] = str(MEMORY_SHARE)
        env[f"LLM_ENGINE_ARGS_{slot.upper()}"] = kv
    if redis_port is not None:
        env |= {"REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(redis_port)}
    env.update(extra)
    return env


def service(name: str, env: dict[str, str], log_dir: Path) -> tuple[Process, str]:
    return Process(name, [sys.executable, "-m", "llm_service"], env, log_dir), f"http://127.0.0.1:{env['APP_PORT']}"
