"""`scripts/gpu-check.sh`: the GPU start path in one run (plan, preload, a chat per slot, an image,
a swap, an engine kill and its recovery) and one JSON report with planned against measured bytes.

On a GPU it starts `python -m llm_service` with the defaults; `--device-memory` mimics a smaller
card on a big one by giving every slot the share, context and budget the plan gives on the smaller
card, rescaled to the real one (vLLM's shares are of the real device). `--dry-run` needs no GPU:
the same steps, over HTTP, against the app on fake engines that report a simulated footprint.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

from llm_service.tools.plan import parse_size

GIB = 1024**3
# vLLM's log lines that carry memory figures (weights, KV cache, CUDA graphs, free memory).
MEMORY_LINE = re.compile(r"Model loading took|KV cache|CUDA graph|GiB|memory", re.I)


@dataclass
class Step:
    name: str
    ok: bool = False
    seconds: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    gpu_before: Any = None
    gpu_after: Any = None


class Target(Protocol):
    """A running service the steps talk to over HTTP."""

    base_url: str

    def kill_engine(self) -> str:
        """Kill one engine the way a crash would; return what was killed."""

    def log_lines(self) -> list[str]:
        """The service's log lines so far."""

    def close(self) -> None:
        """Stop the service."""


def nvidia_smi() -> dict[str, Any] | str:
    """GPU memory by nvidia-smi, device-wide and per process; a reason when there is none."""
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi not found"

    def query(*args: str) -> list[str]:
        out = subprocess.run(["nvidia-smi", *args, "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=False)
        return [line.strip() for line in out.stdout.splitlines() if line.strip()]

    return {
        "gpus_mib": query("--query-gpu=index,name,memory.used,memory.total"),
        "processes_mib": query("--query-compute-apps=pid,process_name,used_memory"),
    }


def plan(device_memory: int | None, offline: bool) -> dict[str, Any]:
    """`python -m llm_service plan --json` for the GPU (the real one without `device_memory`)."""
    args = [sys.executable, "-m", "llm_service", "plan", "--device", "cuda", "--json"]
    args += ["--device-memory", str(device_memory)] if device_memory else []
    args += ["--offline"] if offline else []
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode not in (0, 1):
        raise RuntimeError(f"plan failed ({done.returncode}): {done.stderr.strip()}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def mimic_env(small: dict[str, Any], real_memory: int) -> dict[str, str]:
    """Settings that give every slot, on the real card, the bytes the plan gives it on the small one."""
    scale = small["device"]["memory_bytes"] / real_memory
    env = {"LLM_GPU_MEMORY_UTILIZATION": f"{small['device']['budget'] * scale:.6f}"}
    for slot in small["slots"]:
        name = slot["slot"].upper()
        env[f"LLM_MEMORY_SHARE_{name}"] = f"{slot['share'] * scale:.6f}"
        env[f"LLM_MAX_MODEL_LEN_{name}"] = str(slot["max_model_len"])
    return env


def tiny_png() -> str:
    """A 64x64 PNG as a data: URL."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def call(client: httpx.Client, method: str, path: str, deadline: float, **kwargs: Any) -> httpx.Response:
    """One request, retried on 503 after its Retry-After (a load, a swap, a recovery) until `deadline`."""
    while True:
        response = client.request(method, path, **kwargs)
        if response.status_code != 503 or time.monotonic() >= deadline:
            return response
        time.sleep(min(float(response.headers.get("retry-after", 2)), 10.0, max(0.0, deadline - time.monotonic())))


def chat(client: httpx.Client, slot: str, deadline: float, image: str | None = None) -> dict[str, Any]:
    content: Any = "Say hello in three words."
    if image is not None:
        content = [{"type": "text", "text": "What colour is this?"}, {"type": "image_url", "image_url": {"url": image}}]
    body = {"model": slot, "messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0}
    started = time.monotonic()
    response = call(client, "POST", "/v1/chat/completions", deadline, json=body)
    if response.status_code != 200:
        raise RuntimeError(f"chat on {slot}: HTTP {response.status_code} {response.text[:300]}")
    answer = response.json()["choices"][0]["message"]["content"]
    return {"slot": slot, "seconds": round(time.monotonic() - started, 2), "answer": answer}


def models(client: httpx.Client) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = client.get("/health").json()["dependencies"]["models"]
    return result


def wait_ready(client: httpx.Client, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            if client.get("/health/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(1.0)
    raise RuntimeError("not ready before the deadline")


class Checker:
    """Runs the steps in order against a target, each with nvidia-smi before and after."""

    def __init__(self, target: Target, timeout: float) -> None:
        self.target = target
        self.timeout = timeout
        self.client = httpx.Client(base_url=target.base_url, timeout=timeout)
        self.steps: list[Step] = []

    def run(self, name: str, action: Callable[[float], dict[str, Any]]) -> bool:
        step = Step(name, gpu_before=nvidia_smi())
        started = time.monotonic()
        try:
            step.detail = action(started + self.timeout)
            step.ok = True
        except Exception as exc:  # recorded in the report; the remaining steps still run
            step.error = f"{type(exc).__name__}: {exc}"
        step.seconds = round(time.monotonic() - started, 2)
        step.gpu_after = nvidia_smi()
        self.steps.append(step)
        return step.ok

    def preload(self, deadline: float) -> dict[str, Any]:
        wait_ready(self.client, deadline)
        return {"models": models(self.client)}

    def chat_each(self, deadline: float) -> dict[str, Any]:
        slots = [name for name, slot in models(self.client).items() if slot["kind"] == "generate"]
        return {"answers": [chat(self.client, slot, deadline) for slot in slots]}

    def image(self, deadline: float) -> dict[str, Any]:
        return chat(self.client, "multimodal", deadline, image=tiny_png())

    def swap(self, deadline: float) -> dict[str, Any]:
        unloaded = [n for n, s in models(self.client).items() if s["kind"] == "generate" and s["state"] != "loaded"]
        if not unloaded:
            return {"swapped": [], "note": "every slot is loaded at once on this card: nothing to swap"}
        return {"swapped": [chat(self.client, slot, deadline) for slot in unloaded]}

    def kill(self, deadline: float) -> dict[str, Any]:
        killed = self.target.kill_engine()
        # The death shows as a slot with an error (and readiness 503 for a preloaded slot).
        noticed = None
        until = min(deadline, time.monotonic() + 60)
        while time.monotonic() < until and noticed is None:
            noticed = next((n for n, s in models(self.client).items() if s["error"]), None)
            time.sleep(0.2)
        if noticed is None:
            raise RuntimeError(f"{killed}, but no slot went down within 60 s")
        wait_ready(self.client, deadline)
        # Recovered: every slot serves again (a lazily loaded one loads on this request).
        answers = self.chat_each(deadline)["answers"]
        return {"killed": killed, "slot_down": noticed, "answers": answers}


def engines_of(checker: Checker) -> dict[str, dict[str, Any]]:
    """Planned against measured bytes and load time per slot, as the service reports them."""
    try:
        described = models(checker.client)
    except Exception as exc:
        return {"error": {"reason": str(exc)}}
    return {
        name: {k: slot.get(k) for k in ("state", "memory_share", "memory_planned_bytes", "memory_measured_bytes",
                                          "last_load_seconds", "max_model_len", "error")}
        for name, slot in described.items()
    }


def check(target: Target, planned: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Every step against `target`; the report."""
    checker = Checker(target, timeout)
    try:
        checker.run("preload", checker.preload)
        checker.run("chat_each_slot", checker.chat_each)
        checker.run("image_on_multimodal", checker.image)
        checker.run("swap", checker.swap)
        checker.run("engine_kill_and_recovery", checker.kill)
        engines = engines_of(checker)
    finally:
        checker.client.close()
        target.close()
    lines = [line for line in target.log_lines() if MEMORY_LINE.search(line)]
    return {
        "ok": planned["fits"] and all(step.ok for step in checker.steps),
        "plan": planned,
        "steps": [asdict(step) for step in checker.steps],
        "engines": engines,
        "memory_log_lines": lines[-200:],
    }


class ServiceProcess:
    """`python -m llm_service` on this machine's GPU, its log in a file."""

    def __init__(self, env: dict[str, str], port: int, log_path: Path) -> None:
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        environment = {**os.environ, **env, "LLM_DEVICE": "cuda", "APP_HOST": "127.0.0.1", "APP_PORT": str(port),
                       "LLM_LOAD_RETRY_SECONDS": "5"}
        self._log = log_path.open("w")
        self.process = subprocess.Popen([sys.executable, "-m", "llm_service"], env=environment,
                                        stdout=self._log, stderr=subprocess.STDOUT)

    def kill_engine(self) -> str:
        import psutil

        # GPU-only: vLLM titles its engine core processes VLLM::EngineCore (the kernel's name of a
        # process keeps 15 characters of it).
        for child in psutil.Process(self.process.pid).children(recursive=True):
            if "EngineCor" in " ".join(child.cmdline()) or "EngineCor" in child.name():
                child.send_signal(signal.SIGKILL)
                return f"SIGKILL to engine core pid {child.pid}"
        raise RuntimeError("no engine core process found")

    def log_lines(self) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines()

    def close(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu-check.sh", description=__doc__)
    parser.add_argument("--device-memory", type=parse_size, help="mimic a card of this size, e.g. 24GiB")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: fake engines, every step's wiring")
    parser.add_argument("--report", type=Path, default=Path("gpu-check-report.json"))
    parser.add_argument("--port", type=int, default=8012)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per step")
    args = parser.parse_args(argv)
    started = time.time()
    report: dict[str, Any] = {"dry_run": args.dry_run, "started_at": started, "device_memory_bytes": args.device_memory}
    try:
        if args.dry_run:
            from llm_service.tools.gpu_check_dry import DryService

            memory = args.device_memory or 24 * GIB
            planned = plan(memory, offline=True)
            target: Target = DryService(memory, args.port)
        else:
            real = plan(None, offline=False)
            planned = plan(args.device_memory, offline=False) if args.device_memory else real
            env = mimic_env(planned, real["device"]["memory_bytes"]) if args.device_memory else {}
            report["mimic_env"] = env
            target = ServiceProcess(env, args.port, args.report.with_suffix(".log"))
        report.update(check(target, planned, args.timeout))
    except Exception as exc:
        report.update(ok=False, error=f"{type(exc).__name__}: {exc}")
    report["seconds"] = round(time.time() - started, 1)
    args.report.write_text(json.dumps(report, indent=2, default=str) + "\n")
    failed = [s["name"] for s in report.get("steps", []) if not s["ok"]]
    sys.stdout.write(f"gpu-check: {'OK' if report['ok'] else 'FAILED'}"
                     + (f" (failed: {', '.join(failed)})" if failed else "") + f"; report: {args.report}\n")
    return 0 if report["ok"] else 1



if __name__ == "__main__":
    sys.exit(main())
