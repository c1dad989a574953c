"""A soak: the service under steady mixed traffic for N minutes, its resources sampled every few seconds.

python -m bench.soak --minutes 30 starts a redis-server and the service (demo model in `standard` and
`longctx`, a budget that holds one engine, the cache on), then drives at a steady rate: chat with unique
prompts, streams read to the end, one repeated request (cache hits), streams dropped after a few chunks
(client disconnects), bursts beyond the slot's pending bound (429s) and, every --swap-every seconds, a
request to the other slot (each one a swap, and the next `standard` request swaps back). Every
--interval seconds it samples the RSS and open files of the service and all its child processes (engine
cores, workers), the API process's asyncio tasks and each engine's KV cache usage (from /metrics),
Redis' connected clients and /health/live. It writes samples.csv and summary.json (with the slope of
every figure after warm-up) to bench/results/soak-<time>/ and a plot to bench/plots/soak.png.
Like every benchmark it records and asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import re
import socket
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.plan import MEMORY_SHARE, ROOT
from bench.servers import MIB, Redis, free_port, http_ok, service, service_env

SLOTS = ("standard", "longctx")
MAX_PENDING = 4  # per slot: a burst of BURST unique requests beyond it gets 429s
BURST = 8
KV_CACHE_BYTES = 512 * MIB
# Figures fitted for a slope, with what counts as flat: the fitted change over the run after warm-up
# stays within the larger of twice the samples' scatter around the line and this floor.
FIGURES = {
    "rss_mib": ("RSS, all processes (MiB)", lambda mean: 0.01 * mean),
    "api_rss_mib": ("RSS, API process (MiB)", lambda mean: 0.01 * mean),
    "fds": ("open files, all processes", lambda mean: 2.0),
    "tasks": ("asyncio tasks, API process", lambda mean: 2.0),
    "redis_clients": ("Redis connected clients", lambda mean: 1.0),
    "kv_usage": ("KV cache usage (max over slots)", lambda mean: 0.02),
}


class Tally:
    """Responses by traffic kind and outcome (status code, `hit`, `disconnect` or an error name)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, kind: str, outcome: str | int) -> None:
        self.counts[f"{kind}:{outcome}"] += 1

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


def chat(slot: str, text: str, max_tokens: int, stream: bool = False) -> dict[str, Any]:
    return {
        "model": slot,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


class Traffic:
    """The mixed workload: one loop per kind, each firing at its own steady period."""

    def __init__(self, client: httpx.AsyncClient, tally: Tally, swap_every: float) -> None:
        self.client = client
        self.tally = tally
        self.swap_every = swap_every
        self.sequence = 0

    def unique(self, what: str) -> str:
        self.sequence += 1
        return f"{what} (request {self.sequence}, {time.time():.3f})"

    async def send(self, kind: str, body: dict[str, Any]) -> None:
        try:
            r = await self.client.post("/v1/chat/completions", json=body)
        except httpx.HTTPError as exc:
            self.tally.add(kind, type(exc).__name__)
            return
        hit = r.status_code == 200 and r.headers.get("x-cache", "").startswith("HIT")
        self.tally.add(kind, "hit" if hit else r.status_code)

    async def chat(self) -> None:
        await self.send("chat", chat("standard", self.unique("Say one short sentence about the sea."), 12))

    async def cached(self) -> None:
        await self.send("cached", chat("standard", "Name three fruits.", 12))

    async def stream(self, kind: str, drop_after: int | None) -> None:
        body = chat("standard", self.unique("Count slowly from one to fifty."), 48 if drop_after is None else 200, True)
        try:
            async with self.client.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    self.tally.add(kind, r.status_code)
                    return
                chunks = 0
                async for _ in r.aiter_lines():
                    chunks += 1
                    if drop_after is not None and chunks >= drop_after:
                        break  # leaving the block closes the connection mid-stream
            self.tally.add(kind, "disconnect" if drop_after is not None else 200)
        except httpx.HTTPError as exc:
            self.tally.add(kind, type(exc).__name__)

    async def burst(self) -> None:
        bodies = [chat("standard", self.unique("Write a long list of animals."), 64) for _ in range(BURST)]
        await asyncio.gather(*(self.send("burst", body) for body in bodies))

    async def malformed(self) -> None:
        body = b'{"model": "standard", "messages": ['
        r = await self.client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        self.tally.add("malformed", r.status_code)

    async def swap(self) -> None:
        await self.send("swap", chat("longctx", self.unique("Say hello."), 8))

    def loops(self) -> list[tuple[float, float, Callable[[], Awaitable[None]]]]:
        """(period, first delay, action) of every kind."""
        plan: list[tuple[float, float, Callable[[], Awaitable[None]]]] = [
            (2.0, 0.0, self.chat),
            (1.0, 0.3, self.cached),
            (5.0, 0.6, lambda: self.stream("stream", None)),
            (6.0, 1.1, lambda: self.stream("disconnect", 3)),
            (30.0, 2.0, self.burst),
            (5.0, 2.5, self.malformed),
        ]
        if self.swap_every > 0:
            plan.append((self.swap_every, self.swap_every / 2, self.swap))
        return plan


async def steady(period: float, delay: float, action: Callable[[], Awaitable[None]], until: float) -> None:
    """Run `action` every `period` seconds (one at a time; a late one starts at once) until `until`."""
    next_at = time.monotonic() + delay
    while next_at < until:
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await action()
        next_at = max(next_at + period, time.monotonic())


def redis_clients(port: int) -> int | None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"INFO clients\r\n")
            data = b""
            while b"connected_clients:" not in data or not data.endswith(b"\r\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    match = re.search(rb"connected_clients:(\d+)", data)
    return int(match.group(1)) if match else None


def metric_values(text: str, name: str) -> dict[str, float]:
    """label text -> value of every series of one metric in Prometheus' text format."""
    found = {}
    for match in re.finditer(rf"^{name}(\{{[^}}]*\}})? ([\d.e+-]+)$", text, re.MULTILINE):
        found[match.group(1) or ""] = float(match.group(2))
    return found


def processes(pid: int) -> list[tuple[str, int, int]]:
    """(name, RSS bytes, open files) of the process and all its descendants."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return []
    rows = []
    for proc in procs:
        try:
            rows.append((proc.name(), proc.memory_info().rss, proc.num_fds()))
        except psutil.Error:
            continue
    return rows


async def sample(client: httpx.AsyncClient, pid: int, redis_port: int, began: float, tally: Tally) -> dict[str, Any]:
    procs = processes(pid)
    row: dict[str, Any] = {
        "t": round(time.monotonic() - began, 1),
        "rss_mib": round(sum(rss for _, rss, _ in procs) / MIB, 1),
        "api_rss_mib": round(procs[0][1] / MIB, 1) if procs else None,
        "fds": sum(fds for _, _, fds in procs),
        "processes": len(procs),
        "redis_clients": await asyncio.to_thread(redis_clients, redis_port),
        "tasks": None,
        "kv_usage": None,
        "live": None,
        "responses": sum(tally.counts.values()),
    }
    try:
        row["live"] = (await client.get("/health/live", timeout=10)).status_code
        text = (await client.get("/metrics", timeout=10)).text
    except httpx.HTTPError as exc:
        row["live"] = type(exc).__name__
        row["loaded"] = None
        return row
    tasks = metric_values(text, "llm_event_loop_tasks")
    usage = metric_values(text, "llm_engine_kv_cache_usage")
    row["tasks"] = int(tasks[""]) if "" in tasks else None
    row["kv_usage"] = round(max(usage.values()), 4) if usage else None
    loaded = metric_values(text, "llm_model_loaded")
    row["loaded"] = "+".join(s for s in SLOTS if loaded.get(f'{{model="{s}"}}') == 1.0) or "-"
    return row


def in_steady_state(sample: dict[str, Any]) -> bool:
    """Whether a sample shows the steady state: traffic running and `standard` serving alone. During
    a swap the figures follow the engines (a process tree of one engine, none, or one loading)."""
    return not sample.get("after") and sample.get("loaded", "standard") == "standard"


def slope(samples: list[dict[str, Any]], key: str, warmup: float) -> dict[str, Any] | None:
    """Least-squares slope (per hour) of one figure over the steady samples after warm-up, the scatter
    around the line, and whether the fitted change over that window counts as growth (FIGURES)."""
    points = [
        (s["t"], float(s[key]))
        for s in samples
        if s["t"] >= warmup and in_steady_state(s) and isinstance(s.get(key), int | float)
    ]
    if len(points) < 3:
        return None
    ts, ys = [p[0] for p in points], [p[1] for p in points]
    t_mean, y_mean = statistics.fmean(ts), statistics.fmean(ys)
    var = sum((t - t_mean) ** 2 for t in ts)
    per_second = sum((t - t_mean) * (y - y_mean) for t, y in points) / var if var else 0.0
    residuals = [y - (y_mean + per_second * (t - t_mean)) for t, y in points]
    scatter = statistics.pstdev(residuals)
    change = per_second * (ts[-1] - ts[0])
    bound = max(2 * scatter, FIGURES[key][1](y_mean))
    return {
        "figure": FIGURES[key][0],
        "first": ys[0],
        "last": ys[-1],
        "min": min(ys),
        "max": max(ys),
        "mean": round(y_mean, 3),
        "slope_per_hour": round(per_second * 3600, 3),
        "fitted_change": round(change, 3),
        "flat_bound": round(bound, 3),
        "grows": change > bound,
    }


def plot(samples: list[dict[str, Any]], warmup: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(FIGURES), 1, figsize=(9, 2.1 * len(FIGURES)), sharex=True)
    for ax, (key, (title, _)) in zip(axes, FIGURES.items(), strict=True):
        points = [(s["t"] / 60, s[key]) for s in samples if isinstance(s.get(key), int | float)]
        ax.plot([p[0] for p in points], [p[1] for p in points], linewidth=0.6, color="lightgrey")
        steady = [(s["t"] / 60, s[key]) for s in samples if in_steady_state(s) and isinstance(s.get(key), int | float)]
        ax.plot([p[0] for p in steady], [p[1] for p in steady], ".", markersize=2)
        ax.axvline(warmup / 60, color="grey", linestyle=":", linewidth=1)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=8)
    axes[-1].set_xlabel("minutes (dots: steady samples, standard serving; grey: swaps; dotted: end of warm-up)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


async def drive(base_url: str, pid: int, redis_port: int, args: argparse.Namespace) -> dict[str, Any]:
    tally = Tally()
    samples: list[dict[str, Any]] = []
    began = time.monotonic()
    until = began + args.minutes * 60
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
    async with (
        httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as traffic_client,
        httpx.AsyncClient(base_url=base_url, timeout=30) as probe,
    ):
        traffic = Traffic(traffic_client, tally, args.swap_every)
        loops = [asyncio.create_task(steady(*spec, until)) for spec in traffic.loops()]
        while time.monotonic() < until:
            samples.append(await sample(probe, pid, redis_port, began, tally))
            if args.verbose:
                print(json.dumps(samples[-1]), flush=True)
            await asyncio.sleep(max(0.0, args.interval - (time.monotonic() - began - samples[-1]["t"])))
        await asyncio.gather(*loops)  # the last requests finish; nothing is cut off
        samples.append({**await sample(probe, pid, redis_port, began, tally), "after": True})
    return {"samples": samples, "responses": tally.as_dict()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.results or ROOT / "bench" / "results" / f"soak-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    redis = Redis(out).launch()
    port = free_port()
    kv = json.dumps({"kv_cache_memory_bytes": KV_CACHE_BYTES, "dtype": "float32"})
    env = service_env(
        port,
        redis.port,
        "",
        MEMORY_SHARE * 1.5,  # holds one engine: the two slots swap
        True,
        LLM_MAX_PENDING_PER_SLOT=str(MAX_PENDING),
        LLM_MAX_MODEL_LEN_STANDARD="2048",
        LLM_MAX_MODEL_LEN_LONGCTX="2048",
        LLM_ENGINE_ARGS_STANDARD=kv,
        LLM_ENGINE_ARGS_LONGCTX=kv,
    )
    proc, base_url = service("soak", env, out)
    began = time.time()
    try:
        proc.start(http_ok(base_url + "/health/live"))
        assert proc.proc is not None
        with httpx.Client(base_url=base_url, timeout=600) as client:  # the first load, before the clock runs
            client.post("/v1/chat/completions", json=chat("standard", "Hello.", 4)).raise_for_status()
        result = asyncio.run(drive(base_url, proc.proc.pid, redis.port, args))
    finally:
        proc.stop()
        redis.stop()
    warmup = args.warmup_minutes * 60 if args.warmup_minutes is not None else min(300.0, args.minutes * 60 / 6)
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "minutes": args.minutes,
        "interval_seconds": args.interval,
        "swap_every_seconds": args.swap_every,
        "warmup_seconds": warmup,
        "wall_seconds": round(time.time() - began, 1),
        "responses": result["responses"],
        "results": str(out),
    }
    return write(out, meta, result["samples"], args.plot)


def write(out: Path, meta: dict[str, Any], samples: list[dict[str, Any]], plot_path: Path) -> dict[str, Any]:
    """samples.csv, summary.json (the slopes) and the plot of one run."""
    slopes = {key: slope(samples, key, meta["warmup_seconds"]) for key in FIGURES}
    summary = {**meta, "samples": len(samples), "slopes": slopes}
    with (out / "samples.csv").open("w", newline="") as f:
        fields = sorted({key for s in samples for key in s}, key=lambda k: (k != "t", k))
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(samples)
    (out / "summary.json").write_text(json.dumps({**summary, "sample_rows": samples}, indent=1))
    plot(samples, meta["warmup_seconds"], plot_path)
    return summary


def rewrite(results: Path, plot_path: Path) -> dict[str, Any]:
    """The slopes and the plot of an earlier run again, from its summary.json (after a change to them)."""
    saved = json.loads((results / "summary.json").read_text())
    samples = saved.pop("sample_rows")
    meta = {k: v for k, v in saved.items() if k not in ("samples", "slopes")}
    return write(results, meta, samples, plot_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the traffic (default 30)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples (default 5)")
    parser.add_argument(
        "--swap-every", type=float, default=300.0, help="seconds between requests to longctx (0: no swaps)"
    )
    parser.add_argument(
        "--warmup-minutes", type=float, default=None, help="left out of the slopes (default: a sixth, at most 5)"
    )
    parser.add_argument("--results", type=Path, default=None, help="directory for samples.csv and summary.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "bench" / "plots" / "soak.png")
    parser.add_argument("--verbose", action="store_true", help="print every sample")
    parser.add_argument(
        "--rewrite", action="store_true", help="no run: the slopes and plot of --results' summary.json again"
    )
    args = parser.parse_args()
    if args.rewrite and args.results is None:
        parser.error("--rewrite needs --results")
    summary = rewrite(args.results, args.plot) if args.rewrite else run(args)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
