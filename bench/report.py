"""BENCHMARKS.md and its plots from one run's results (hand-written notes in the file are kept)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

NOTES = re.compile(r"<!-- notes -->.*?<!-- /notes -->", re.DOTALL)
# Figure (vLLM's result key), column title.
COLUMNS = (
    ("output_throughput", "out tok/s"), ("request_throughput", "req/s"),
    ("median_ttft_ms", "TTFT p50"), ("p99_ttft_ms", "TTFT p99"), ("median_itl_ms", "ITL p50"),
    ("p99_itl_ms", "ITL p99"), ("median_e2el_ms", "E2E p50"), ("p99_e2el_ms", "E2E p99"),
)  # fmt: skip
# Ours endpoint -> the peer endpoint of `vllm serve` it is compared with.
PEERS = {
    "/v1/completions": "/v1/completions",
    "/v1/chat/completions": "/v1/chat/completions",
    "/generate": "/v1/completions",
}


def _runs(results: dict[str, Any]) -> list[dict[str, Any]]:
    runs = []
    for server in ("bare", "vllm-serve", "ours"):
        section = results.get(server) or {}
        found = section.get("runs")
        if isinstance(found, list):
            runs.extend(found)
    return runs


def _find(runs: list[dict[str, Any]], server: str, endpoint: str, workload: str, c: int) -> dict[str, Any] | None:
    for run in runs:
        if (run["server"], run["endpoint"], run["workload"], run["concurrency"]) == (server, endpoint, workload, c):
            return dict(run["figures"])
    return None


def ratio(ours: dict[str, Any] | None, peer: dict[str, Any] | None, key: str) -> float | None:
    if not ours or not peer or not ours.get(key) or not peer.get(key):
        return None
    return round(float(ours[key]) / float(peer[key]), 3)


def ratios(results: dict[str, Any]) -> list[dict[str, Any]]:
    """ours / `vllm serve` and ours / bare engine, per workload, concurrency and ours' endpoint."""
    runs = _runs(results)
    rows = []
    for run in runs:
        if run["server"] != "ours":
            continue
        w, c, endpoint = run["workload"], run["concurrency"], run["endpoint"]
        ours = run["figures"]
        serve = _find(runs, "vllm-serve", PEERS[endpoint], w, c)
        bare = _find(runs, "bare", "AsyncLLM", w, c)
        row: dict[str, Any] = {"workload": w, "concurrency": c, "endpoint": endpoint}
        for key, _ in COLUMNS:
            row[f"{key}/serve"] = ratio(ours, serve, key)
        row["output_throughput/bare"] = ratio(ours, bare, "output_throughput")
        row["median_ttft_ms/bare"] = ratio(ours, bare, "median_ttft_ms")
        row["median_itl_ms/bare"] = ratio(ours, bare, "median_itl_ms")
        rows.append(row)
    return rows


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) if not isinstance(v, str) else v for v in row) + " |" for row in rows]
    return [*lines, ""]


def throughput_tables(results: dict[str, Any]) -> list[str]:
    runs = _runs(results)
    lines: list[str] = []
    for workload in dict.fromkeys(r["workload"] for r in runs):
        lines += [f"### {workload}", ""]
        header = ["c", "server", "endpoint", "prompts", "failed", *(title for _, title in COLUMNS)]
        rows = []
        for run in sorted((r for r in runs if r["workload"] == workload), key=lambda r: r["concurrency"]):
            f = run["figures"]
            rows.append(
                [run["concurrency"], run["server"], run["endpoint"], run["prompts"], f.get("failed"),
                 *(f.get(key) for key, _ in COLUMNS)]
            )
        lines += _table(header, rows)
    return lines


def ratio_table(results: dict[str, Any]) -> list[str]:
    header = ["workload", "c", "ours endpoint", "tok/s ÷serve", "req/s ÷serve", "TTFT p50 ÷serve", "TTFT p99 ÷serve",
              "ITL p50 ÷serve", "ITL p99 ÷serve", "E2E p50 ÷serve", "E2E p99 ÷serve", "tok/s ÷bare", "TTFT p50 ÷bare",
              "ITL p50 ÷bare"]  # fmt: skip
    rows = [
        [r["workload"], r["concurrency"], r["endpoint"], *(r[f"{k}/serve"] for k, _ in COLUMNS),
         r["output_throughput/bare"], r["median_ttft_ms/bare"], r["median_itl_ms/bare"]]
        for r in ratios(results)
    ]
    return _table(header, [[*row[:3], *(_fmt(v, 2) for v in row[3:])] for row in rows])


def server_table(results: dict[str, Any]) -> list[str]:
    rows = []
    for name in ("bare", "vllm-serve", "ours"):
        server = (results.get(name) or {}).get("server")
        if not server:
            continue
        rss = server.get("rss") or {}
        procs = ", ".join(f"{p['name']} {p['peak_mib']}" for p in rss.get("processes", []) if p["peak_mib"] >= 50)
        rows.append([name, server.get("start_seconds"), rss.get("total_mib"), procs])
    return _table(["server", "start s", "peak RSS MiB (all processes)", "per process (MiB, ≥50)"], rows)


def _cache_series(results: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(series name -> ab levels), ours' cache section, LiteLLM's section."""
    ours = (results.get("ours") or {}).get("cache") or {}
    litellm = (results.get("ours") or {}).get("litellm") or {}
    series = {
        "ours /health/live (no cache, the floor)": ours.get("health_live"),
        "ours /generate hit": ours.get("generate_hit"),
        "ours /v1/chat/completions hit": ours.get("chat_hit"),
        "LiteLLM proxy /v1/chat/completions hit": litellm.get("chat_hit"),
    }
    return {name: levels for name, levels in series.items() if isinstance(levels, list)}, ours, litellm


def cache_table(results: dict[str, Any]) -> list[str]:
    series, ours, litellm = _cache_series(results)
    floor = {lv["concurrency"]: lv for lv in ours.get("health_live") or []}
    proxy = {lv["concurrency"]: lv for lv in litellm.get("chat_hit") or []}

    def per(table: dict[int, Any], lv: dict[str, Any]) -> str:
        value = ratio(lv, table.get(lv["concurrency"]), "requests_per_second")
        return "-" if value is None else f"{value:.2f}"

    rows = [
        [name, lv["concurrency"], lv["requests"], lv["failed"], lv["requests_per_second"], lv["p50_ms"], lv["p99_ms"],
         per(floor, lv), per(proxy, lv)]
        for name, levels in series.items()
        for lv in levels
    ]
    lines = _table(["endpoint", "c", "requests", "failed", "req/s", "p50 ms", "p99 ms", "÷ /health/live", "÷ LiteLLM"],
                   rows)
    for label, section in (("ours", ours), ("LiteLLM", litellm)):
        if "error" in section:
            lines += [f"{label}: failed: {section['error']}", ""]
    return lines


def flood_lines(flood: dict[str, Any]) -> list[str]:
    """The flood (bench/flood.py): the excess refused at once, the admitted served, liveness throughout."""
    if not flood:
        return []
    if "error" in flood:
        return ["## Flood", "", f"failed: {flood['error']}", ""]
    refusal, live = flood["refusal"], flood["live"]
    lines = [
        "## Flood",
        "",
        f"{flood['sent']} requests (20 x the {flood['at_once']} that run at once, {flood['max_tokens']} tokens "
        f"reserved each, `X-Request-Timeout: {flood['request_timeout_seconds']:g}`) sent at once, one connection "
        f"each ({flood.get('client', 'a Python asyncio client')}); statuses {flood['statuses']}, {flood['ended']} of "
        f"{flood['sent']} ended; {flood['refused_with_retry_after']} of {flood['refused']} 429s carry Retry-After. "
        "Client-measured ms" + ("" if flood.get("split_exact", True) else
                                " (the 429s' times are the fastest as many: some served request was faster)") + ":",
        "",
    ]
    rows = [
        ["429 (refused)", flood["refused"], refusal["p50_ms"], refusal["p99_ms"], refusal["max_ms"]],
        ["/health/live meanwhile", f"{live['ok']}/{live['probes']} ok", live["p50_ms"], live["p99_ms"],
         live["max_ms"]],
    ]
    burst = flood.get("live_burst")
    if burst:
        rows.append(["as many /health/live at once (the floor)", f"{burst['ok']}/{burst['sent']} ok",
                     burst["p50_ms"], burst["p99_ms"], burst["max_ms"]])
    lines += _table(["", "count", "p50 ms", "p99 ms", "max ms"], rows)
    lines += [f"Served: {flood['served']} (slowest {flood['served_seconds_max']} s); all ended in "
              f"{flood['wall_seconds']} s.", ""]
    return lines


def _finish(ax: Any, title: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency")
    ax.set_title(title)
    ax.grid(alpha=0.3)


def _save(fig: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path.name


def _plot(results: dict[str, Any], plots: Path) -> list[str]:
    """Throughput and TTFT against concurrency per workload (every target), and cache hits beside LiteLLM."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    made = []
    runs = _runs(results)
    for workload in dict.fromkeys(r["workload"] for r in runs):
        mine = [r for r in runs if r["workload"] == workload]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for key, ax, title in (("output_throughput", axes[0], "output tokens/s"),
                               ("median_ttft_ms", axes[1], "TTFT p50 (ms)")):  # fmt: skip
            for target in dict.fromkeys((r["server"], r["endpoint"]) for r in mine):
                points = sorted(
                    (r["concurrency"], r["figures"][key])
                    for r in mine
                    if (r["server"], r["endpoint"]) == target and r["figures"].get(key)
                )
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", label=f"{target[0]} {target[1]}")
            _finish(ax, title)
        axes[1].set_yscale("log")
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{workload} ({results['meta']['plan']} run)")
        made.append(_save(fig, plots / f"throughput-{workload}.png"))
    series, _, _ = _cache_series(results)
    if series:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for name, levels in series.items():
            cs = [lv["concurrency"] for lv in levels]
            axes[0].plot(cs, [lv["requests_per_second"] for lv in levels], marker="o", label=name)
            axes[1].plot(cs, [lv["p50_ms"] for lv in levels], marker="o", label=f"{name} p50")
            axes[1].plot(cs, [lv["p99_ms"] for lv in levels], marker="x", linestyle=":", label=f"{name} p99")
        _finish(axes[0], "cache hits/s (ab)")
        _finish(axes[1], "latency (ms)")
        axes[1].set_yscale("log")
        axes[0].legend(fontsize=7)
        axes[1].legend(fontsize=6)
        made.append(_save(fig, plots / "cache-hits.png"))
    return made


def render(results: dict[str, Any], plot_names: list[str], plots_rel: str, notes: str) -> str:
    m = results["meta"]
    ours = results.get("ours") or {}
    lines = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`python -m bench`; `--quick` for the short form) from "
        f"`bench/results/{m['plan']}-*/results.json`; the notes section is written by hand.",
        "",
        "## Run",
        "",
        f"- Date {m['date']}, commit `{m['commit']}`, plan **{m['plan']}**, {m.get('wall_seconds', 0):.0f} s wall.",
        f"- Machine: {m['machine']['cpus']} CPUs ({m['machine']['cpu']}), {m['machine']['memory_gib']} GiB, no GPU; "
        f"load average {m['machine']['load_average_at_start']} at start, "
        f"{m['machine'].get('load_average_at_end')} at end.",
        f"- Versions: Python {m['versions']['python']}, vLLM {m['versions']['vllm']} (CPU build), torch "
        f"{m['versions']['torch']}, LiteLLM {m['versions']['litellm']}, ApacheBench 2.3.",
        f"- Engine (every server): {m['engine']['model']}, max_model_len {m['engine']['max_model_len']}, "
        f"memory share {m['engine']['memory_share']}, KV cache {m['engine']['kv_cache_bytes'] // 2**20} MiB, "
        f"{m['engine'].get('dtype', 'model dtype')}, eager, prefix caching off, log stats off; "
        "greedy, `ignore_eos`, one server at a time.",
        "- Load: vLLM's benchmark client (`vllm.benchmarks.serve`, custom dataset written once per run, seed 0, "
        "request rate inf with max concurrency c) for every target; the bare engine is driven by the same client "
        "through an in-process request function. Cache hits: `ab -k`.",
    ]
    for rerun in m.get("reruns", []):
        lines.append(
            f"- Re-run into this report: {', '.join(rerun['sections'])}"
            + (f" ({', '.join(rerun['parts'])} only)" if rerun.get("parts") else "")
            + f" on {rerun.get('date')}, commit "
            f"`{rerun.get('commit')}`, {rerun.get('wall_seconds', 0):.0f} s wall (`python -m bench --only ... --into`)."
        )
    for w in m["workloads"]:
        lines.append(
            f"- Workload **{w['name']}** on `{w['slot']}`: {w['input_len']} ±{int(w['input_range'] * 100)}% words in, "
            f"{w['output_len']} tokens out; prompts per concurrency {w['prompts']}."
        )
    lines += ["", "## Ratios (ours ÷ peer; tok/s and req/s: higher is better, latencies: lower)", ""]
    lines += ratio_table(results)
    lines += ["## Throughput and latency (ms)", "", *throughput_tables(results)]
    lines += ["## Processes", "", *server_table(results)]
    lines += ["## Cache hits", "", *cache_table(results)]
    co = ours.get("coalescing") or {}
    if co and "error" not in co:
        lines += [
            "## Coalescing",
            "",
            f"{co['requests']} identical requests at once: {co['ok']} answered, {co['distinct_texts']} distinct "
            f"text(s), **{co['engine_generations']:.0f} engine generation(s)**, {co['coalesced']:.0f} coalesced; "
            f"{co['wall_seconds']} s for all against {co['one_uncached_request_seconds']} s for one uncached request.",
            "",
        ]
    lines += flood_lines(ours.get("flood") or {})
    swap = results.get("swap") or {}
    bare = (results.get("bare") or {}).get("server") or {}
    if swap and "error" not in swap:
        lines += [
            "## Slot swap (budget holds one engine)",
            "",
            f"- Lazy load through the service (first request, nothing loaded): {swap['lazy_load_request_seconds']} s; "
            f"bare engine start: {bare.get('start_seconds', '-')} s; mean engine load in the service "
            f"(llm_model_load_duration_seconds): {swap['mean_load_seconds']} s over {swap['engine_loads']:.0f} loads.",
            f"- Requests alternating standard/longctx, each a swap: {swap['swap_request_seconds']} s "
            f"({swap['evictions']:.0f} evictions).",
            "",
        ]
    hol = ours.get("head_of_line") or {}
    if hol and "error" not in hol:
        rows = [
            [phase, hol[phase]["stream_itl"]["p50_ms"], hol[phase]["stream_itl"]["p99_ms"],
             hol[phase]["stream_itl"]["max_ms"], hol[phase]["health_live"]["p50_ms"],
             hol[phase]["health_live"]["p99_ms"], hol[phase]["health_live"]["max_ms"]]
            for phase in ("alone", "with_rag")
        ]
        lines += [
            "## Head-of-line",
            "",
            f"{hol['streams']} streams on `standard`, alone and while {hol['rag_prompts']} prompts of ~3000 tokens "
            "arrive on `longctx`; `/health/live` probed every 50 ms throughout (a stalled event loop shows there).",
            "",
        ]
        lines += _table(["phase", "stream ITL p50", "p99", "max", "/health/live p50", "p99", "max"], rows)
    failed = [k for k in ("bare", "vllm-serve", "ours", "swap") if isinstance(results.get(k), dict) and
              "error" in results[k]]  # fmt: skip
    if failed:
        lines += ["## Failed sections", ""] + [f"- {k}: {results[k]['error']}" for k in failed] + [""]
    if plot_names:
        lines += ["## Plots", ""] + [f"![{n}]({plots_rel}/{n})" for n in plot_names] + [""]
    lines += ["## Notes", "", notes, ""]
    return "\n".join(lines)


def write(results: dict[str, Any], path: Path, plots: Path) -> None:
    old = path.read_text() if path.exists() else ""
    found = NOTES.search(old)
    notes = found.group(0) if found else "<!-- notes -->\n<!-- /notes -->"
    names = _plot(results, plots)
    rel = Path(__import__("os").path.relpath(plots, path.parent)).as_posix()
    path.write_text(render(results, names, rel, notes))
