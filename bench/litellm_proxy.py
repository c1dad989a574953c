"""A LiteLLM proxy with a Redis cache in front of a server, in its own venv under .cache/ (installed on demand)."""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from bench.plan import ROOT
from bench.servers import Process, free_port, http_ok

VERSION = "1.106.12"
VENV = ROOT / ".cache" / "bench" / "litellm-venv"


def ensure_installed() -> Path:
    """The proxy's executable; creates the venv and installs litellm[proxy] the first time (minutes)."""
    binary = VENV / "bin" / "litellm"
    marker = VENV / f".installed-{VERSION}"
    if binary.exists() and marker.exists():
        return binary
    sys.stderr.write(f"installing litellm[proxy]=={VERSION} into {VENV}\n")
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "--quiet", "--progress-bar", "off"]
    subprocess.run([*pip, f"litellm[proxy]=={VERSION}"], check=True)
    marker.touch()
    return binary


def config(upstream: str, model: str, redis_port: int) -> str:
    return f"""model_list:
  - model_name: demo
    litellm_params:
      model: hosted_vllm/{model}
      api_base: {upstream}/v1
      api_key: unused
litellm_settings:
  cache: true
  cache_params:
    type: redis
    host: 127.0.0.1
    port: {redis_port}
"""


def proxy(upstream: str, redis_port: int, log_dir: Path) -> tuple[Process, str, str]:
    """The proxy process (not started), its base URL and its master key (random, never a well-known one)."""
    binary = ensure_installed()
    port = free_port()
    path = log_dir / "litellm.yaml"
    path.write_text(config(upstream, "standard", redis_port))
    key = "sk-" + secrets.token_hex(16)
    env = {"LITELLM_MASTER_KEY": key, "LITELLM_LOG": "ERROR", "LITELLM_MODE": "PRODUCTION"}
    cmd = [str(binary), "--config", str(path), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    return Process("litellm", cmd, env, log_dir), f"http://127.0.0.1:{port}", key


def ready(base_url: str) -> Callable[[], bool]:
    return http_ok(base_url + "/health/liveliness")
