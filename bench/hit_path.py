"""The cache-hit path alone: ours with no engine loaded, one entry seeded in Redis, `ab` on it.

    python -m bench.hit_path [--requests 5000] [--profile] [--preload standard] [--redis-only]

A hit needs no engine (its key comes from the request and the slot's configuration), so this
runs in seconds and measures only our HTTP, cache and serialization work, beside /health/live.
--profile records the service with py-spy during the /generate hits (bench/results/hit-path.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench import ab
from bench.plan import ROOT
from bench.servers import Redis, Spy, cpu_seconds, free_port, http_ok, service, service_env

PROMPT = "Name three fruits."


def seed_entry(env: dict[str, str], redis_port: int) -> None:
    """Store the entry the service would store for a greedy /generate of PROMPT (16 tokens)."""
    from redis import Redis as RedisClient

    from llm_service.app import vllm_backend, with_host_args
    from llm_service.cache.controls import CacheControl
    from llm_service.cache.store import CachedChoice, CachedResponse, CachePolicy
    from llm_service.config.engine_configs import build_slot_configs
    from llm_service.config.frontend import with_frontend
    from llm_service.config.settings import load_settings
    from llm_service.engines.base import SamplingOptions
    from llm_service.serving.generation import cache_key_extra

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        settings = load_settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    # The slot's configuration as the service builds it (chat template, tool parser and the dtype
    # the backend picks on this host are key material).
    slots = with_frontend(build_slot_configs(settings.llm, "cpu", None), settings)
    config = with_host_args(next(c for c, _ in slots if c.slot == "standard"), vllm_backend("cpu"))
    sampling = SamplingOptions(max_tokens=16, temperature=0.0)
    plan = CachePolicy(settings.llm).plan(
        CacheControl(), sampling, PROMPT, None, config, extra=cache_key_extra(config.chat)
    )
    assert plan is not None
    text = "Apples, bananas and cherries are three fruits that many people like."
    entry = CachedResponse(config.model_id, PROMPT, 5, (CachedChoice(0, text, "stop", 16),), time.time())
    RedisClient(port=redis_port).set(plan.key, entry.encode(), ex=plan.ttl)


def costed(pid: int, url: str, requests: int, concurrency: int, body: bytes | None = None) -> dict[str, Any]:
    """One ab run, with the service's CPU time per request (steadier than req/s on a busy machine)."""
    before = cpu_seconds(pid)
    figures = ab.run(url, requests, concurrency, body)
    figures["cpu_ms_per_request"] = round((cpu_seconds(pid) - before) * 1000 / requests, 3)
    return figures


def measure(base_url: str, requests: int, levels: tuple[int, ...], profile: Path | None, pid: int) -> dict[str, Any]:
    body = json.dumps({"prompt": PROMPT, "max_tokens": 16, "temperature": 0}).encode()
    out: dict[str, Any] = {"health_live": [costed(pid, base_url + "/health/live", requests, c) for c in levels]}
    recorder = Spy(pid, profile, rate=500) if profile is not None else None
    out["generate_hit"] = [costed(pid, base_url + "/generate", requests, c, body) for c in levels]
    if recorder is not None:
        recorder.stop()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hit_path", description=__doc__)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--log-level", default="INFO", help="APP_LOG_LEVEL of the service (INFO as in production)")
    parser.add_argument("--preload", default="", help="slots to load first (e.g. standard): hits beside a live engine")
    parser.add_argument(
        "--redis-only", action="store_true", help="no in-process tier (LLM_CACHE_LOCAL_MAX_ENTRIES=0): hits from Redis"
    )
    args = parser.parse_args()
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    redis = Redis(out).launch()
    tier = {"LLM_CACHE_LOCAL_MAX_ENTRIES": "0"} if args.redis_only else {}
    env = service_env(free_port(), redis.port, args.preload, 0.35, True, APP_LOG_LEVEL=args.log_level, **tier)
    proc, base_url = service("ours-hit-path", env, out)
    try:
        seed_entry(env, redis.port)
        proc.start(http_ok(base_url + "/health/ready"))
        assert proc.proc is not None
        profile = out / "hit-path.txt" if args.profile else None
        result = measure(base_url, args.requests, (1, 16, 64), profile, proc.proc.pid)
        hit = httpx.post(base_url + "/generate", json={"prompt": PROMPT, "max_tokens": 16, "temperature": 0})
        result["x_cache"] = hit.headers.get("x-cache")
    finally:
        proc.stop()
        redis.stop()
    for name in ("health_live", "generate_hit"):
        for level in result[name]:
            sys.stdout.write(
                f"{name:13} c={level['concurrency']:<3} {level['requests_per_second']:8.1f} req/s "
                f"p50 {level['p50_ms']:7.2f} ms p99 {level['p99_ms']:7.2f} ms "
                f"cpu {level['cpu_ms_per_request']:.3f} ms/request failed {level['failed']}\n"
            )
    sys.stdout.write(f"X-Cache of a hit: {result['x_cache']}\n")
    name = "hit-path-redis-only.json" if args.redis_only else "hit-path.json"
    (out / name).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
