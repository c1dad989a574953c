"""The benchmark harness's own logic: ab's report, the prompt files, the ratios and BENCHMARKS.md."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from bench import __main__ as bench_main
from bench import ab, flood, report, throughput
from bench.dataset import write_prompts
from bench.plan import FULL, QUICK, SMOKE, workload
from bench.soak import slope

AB_REPORT = """
Complete requests:      2000
Failed requests:        37
   (Connect: 0, Receive: 0, Length: 37, Exceptions: 0)
Non-2xx responses:      3
Keep-Alive requests:    1990
Requests per second:    618.25 [#/sec] (mean)
"""
AB_CSV = "Percentage served,Time in ms\n0,0.9\n50,1.61\n99,2.70\n"


def test_ab_failures_are_statuses_and_connection_errors_not_length_differences() -> None:
    figures = ab.parse(AB_REPORT, AB_CSV)
    assert figures == {
        "requests": 2000, "failed": 3, "non_2xx": 3, "requests_per_second": 618.25, "p50_ms": 1.61, "p99_ms": 2.7,
        "keep_alive": 1990,
    }  # fmt: skip


class WordTokenizer:
    """A tokenizer of 40 one-word tokens (and some that are not words)."""

    pieces = [f" w{chr(97 + i % 26)}{chr(97 + i // 26)}x" for i in range(40)] + ["<s>", "12"]

    def __len__(self) -> int:
        return len(self.pieces)

    def decode(self, ids: list[int]) -> str:
        return "".join(self.pieces[i] for i in ids)


def test_prompt_files_are_the_same_every_time_and_sized_as_asked(tmp_path: Path) -> None:
    rag = FULL.workloads[1]
    first = write_prompts(rag, 5, WordTokenizer(), tmp_path / "a.jsonl").read_text()
    again = write_prompts(rag, 5, WordTokenizer(), tmp_path / "b.jsonl").read_text()
    assert first == again
    lines = [json.loads(line) for line in first.splitlines()]
    assert len(lines) == 5
    for line in lines:
        assert line["output_tokens"] == rag.output_len
        assert 1500 <= len(line["prompt"].split()) <= 3000
        assert "<s>" not in line["prompt"]


def test_plans_keep_their_shape() -> None:
    # The smoke form sends one request per setting; the quick form stays smaller than the full one.
    assert all(w.prompts_at(c) == 1 for w in SMOKE.workloads for c in w.levels)
    full_by_name = {w.name: w for w in FULL.workloads}
    for quick in QUICK.workloads:
        full = full_by_name[quick.name]
        assert sum(quick.prompts_at(c) for c in quick.levels) < sum(full.prompts_at(c) for c in full.levels)
    assert FULL.workloads[0].levels == (1, 8, 32, 128)
    # The servers run every level; the bare engine stops where it saturates.
    files = {w.name: Path(f"{w.name}.jsonl") for w in FULL.workloads}
    bare = {(r["workload"], r["concurrency"]) for r in throughput.bare_runs(FULL, files)}
    assert bare == {("short-chat", 1), ("short-chat", 8), ("short-chat", 32), ("rag", 1), ("rag", 8)}
    assert SMOKE.bare_levels(SMOKE.workloads[0]) == SMOKE.workloads[0].levels
    # A workload with no level under the bare engine's cap is left out, not run at every level.
    high = dataclasses.replace(FULL, workloads=(workload("short-chat", 8, (64, 128)),))
    assert throughput.bare_runs(high, {"short-chat": Path("x.jsonl")}) == []


def test_a_rerun_replaces_only_its_sections_and_is_listed() -> None:
    earlier = results()
    rerun = {"meta": {**earlier["meta"], "date": "2026-11-30T10:00:00Z", "commit": "def5678"},
             "ours": {"runs": [run("ours", "/v1/completions", 1, 42.0, 21.0)]}}  # fmt: skip
    merged = bench_main.merged(earlier, rerun, ["ours"])
    assert merged["ours"] == rerun["ours"] and merged["bare"] == earlier["bare"]
    assert merged["meta"]["date"] == earlier["meta"]["date"]
    assert merged["meta"]["reruns"] == [
        {"sections": ["ours"], "date": "2026-11-30T10:00:00Z", "commit": "def5678", "wall_seconds": 10,
         "machine": earlier["meta"]["machine"]}
    ]  # fmt: skip
    text = report.render(merged, [], "", "")
    assert "Re-run into this report: ours on 2026-11-30T10:00:00Z, commit `def5678`" in text
    with pytest.raises(ValueError):
        bench_main.merged(earlier, {**rerun, "meta": {**rerun["meta"], "plan": "full"}}, ["ours"])
    # `--parts flood`: ours keeps its other parts (its runs and cache), the flood is the re-run's.
    flood_only = {"meta": rerun["meta"], "ours": {"flood": {"sent": 140}, "server": {"start_seconds": 20}}}
    part = bench_main.merged(earlier, flood_only, ["ours"], ("flood",))
    assert part["ours"] == {**earlier["ours"], "flood": {"sent": 140}, "server": {"start_seconds": 20}}
    assert part["meta"]["reruns"][0]["parts"] == ["flood"]


def run(server: str, endpoint: str, c: int, tok_s: float, ttft: float) -> dict[str, Any]:
    figures = {key: 1.0 for key, _ in report.COLUMNS} | {"output_throughput": tok_s, "median_ttft_ms": ttft}
    return {"server": server, "endpoint": endpoint, "workload": "short-chat", "concurrency": c, "prompts": c,
            "figures": figures | {"failed": 0}}  # fmt: skip


def results() -> dict[str, Any]:
    return {
        "meta": {
            "plan": "smoke", "date": "2026-11-30T09:00:00Z", "commit": "abc1234", "wall_seconds": 10,
            "machine": {"cpus": 2, "cpu": "x86_64", "memory_gib": 24, "load_average_at_start": [1.0, 1.0, 1.0]},
            "versions": {"python": "3.11", "vllm": "0.32.0", "torch": "2.13.0", "litellm": "1.106.12"},
            "engine": {"model": "demo", "max_model_len": 4096, "memory_share": 0.15, "kv_cache_bytes": 2**30},
            "workloads": [{"name": "short-chat", "slot": "standard", "input_len": 100, "input_range": 0.2,
                           "output_len": 8, "prompts": {1: 1}}],
        },
        "bare": {"runs": [run("bare", "AsyncLLM", 1, 50.0, 10.0)], "server": {"start_seconds": 30}},
        "vllm-serve": {"runs": [run("vllm-serve", "/v1/completions", 1, 40.0, 20.0)]},
        "ours": {
            "runs": [run("ours", "/v1/completions", 1, 38.0, 22.0), run("ours", "/generate", 1, 44.0, 18.0)],
            "cache": {"generate_hit": [{"concurrency": 1, "requests": 10, "failed": 0, "requests_per_second": 600.0,
                                        "p50_ms": 1.5, "p99_ms": 3.0}]},
        },
        "swap": {"error": "RuntimeError: boom"},
    }


def test_ratios_pair_each_endpoint_of_ours_with_its_peer() -> None:
    rows = {r["endpoint"]: r for r in report.ratios(results())}
    assert rows["/v1/completions"]["output_throughput/serve"] == 0.95
    assert rows["/v1/completions"]["median_ttft_ms/serve"] == 1.1
    # /generate is compared with vllm serve's /v1/completions, and with the bare engine.
    assert rows["/generate"]["output_throughput/serve"] == 1.1
    assert rows["/generate"]["output_throughput/bare"] == 0.88


def test_report_keeps_hand_written_notes_and_shows_failures(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("old\n<!-- notes -->\nThe gap is X.\n<!-- /notes -->\n")
    report.write(results(), path, tmp_path / "plots")
    text = path.read_text()
    assert "The gap is X." in text
    assert "| short-chat | 1 | /v1/completions | 0.95 |" in text
    assert "- swap: RuntimeError: boom" in text
    assert "![throughput-short-chat.png](plots/throughput-short-chat.png)" in text
    assert (tmp_path / "plots" / "throughput-short-chat.png").stat().st_size > 0
    assert (tmp_path / "plots" / "cache-hits.png").exists()


def test_the_cache_table_gives_hits_against_the_floor_and_litellm_and_the_flood_its_section() -> None:
    def level(c: int, rps: float) -> dict[str, Any]:
        return {"concurrency": c, "requests": 10, "failed": 0, "requests_per_second": rps, "p50_ms": 1, "p99_ms": 2}

    cache = {"health_live": [level(1, 1000.0)], "generate_hit": [level(1, 520.0)]}
    lines = report.cache_table({"ours": {"cache": cache, "litellm": {"chat_hit": [level(1, 50.0)]}}})
    (hit,) = [line for line in lines if line.startswith("| ours /generate hit")]
    assert hit.endswith("| 0.52 | 10.40 |")
    ms = {"p50_ms": 0.3, "p99_ms": 1.6, "max_ms": 2.0}
    flood = {"sent": 140, "at_once": 7, "max_tokens": 512, "request_timeout_seconds": 10.0, "ended": 140,
             "statuses": {"200": 30, "429": 110}, "refused_with_retry_after": 110, "refused": 110, "served": 30,
             "refusal": ms, "live": {"ok": 5, "probes": 5, **ms}, "live_burst": {"ok": 140, "sent": 140, **ms},
             "served_seconds_max": 4.0, "wall_seconds": 5.0}
    text = "\n".join(report.flood_lines(flood))
    assert "## Flood" in text and "110 of 110 429s carry Retry-After" in text and "the floor" in text
    assert report.flood_lines({}) == []


AB_LOG = """INFO: POST header ==
---
POST /generate HTTP/1.0
---
LOG: header received:
HTTP/1.1 429 Too Many Requests
date: Thu, 03 Dec 2026 16:16:50 GMT
retry-after: 3
content-type: application/json

{"error": {"type": "overloaded"}}
WARNING: Response code not 2xx (429)
LOG: header received:
HTTP/1.1 200 OK
content-type: application/json

LOG: header received:
HTTP/1.1 429 Too Many Requests
content-type: application/json

..done
"""
AB_TIMES = """starttime\tseconds\tctime\tdtime\tttime\twait
Thu Dec 03 16:16:50 2026\t1796314610\t1\t900\t901\t900
Thu Dec 03 16:16:50 2026\t1796314610\t0\t12\t12\t11
Thu Dec 03 16:16:50 2026\t1796314610\t1\t30\t31\t30
"""


def test_an_ab_burst_gives_each_status_its_retry_after_and_the_429s_the_fastest_times() -> None:
    flooded = ab.parse_burst(AB_LOG, AB_TIMES)
    assert flooded == {"statuses": {"429": 2, "200": 1}, "retry_after": {"429": 1}, "ms": [12, 31, 901]}
    burst = {"statuses": {"200": 3}, "retry_after": {}, "ms": [5, 6, 40]}
    figures = flood.summarise(flooded, burst, [(200, 0.004)], served_least_ms=300)
    assert figures["refused"] == 2 and figures["served"] == 1 and figures["refused_with_retry_after"] == 1
    assert figures["refusal"]["p99_ms"] == 31 and figures["served_seconds_max"] == 0.9 and figures["split_exact"]
    assert figures["live_burst"] == {"sent": 3, "ok": 3, "p50_ms": 6.0, "p99_ms": 40.0, "max_ms": 40.0}
    # A 429 as slow as a served request can be: the fastest times may then hold a served one, and it says so.
    assert flood.summarise(flooded, burst, [], served_least_ms=25)["split_exact"] is False


def test_soak_slope_tells_growth_from_noise_and_leaves_out_warm_up() -> None:
    flat = [{"t": t, "fds": 180 + (t // 5) % 3} for t in range(0, 1800, 5)]
    growing = [{"t": t, "fds": 180 + t / 60} for t in range(0, 1800, 5)]  # one more a minute
    warming = [{"t": t, "fds": min(t, 300) / 2} for t in range(0, 1800, 5)]  # climbs for 5 minutes, then holds
    last = {"t": 1800, "fds": 10_000, "after": True}  # sampled after the traffic stopped: left out
    assert slope([*flat, last], "fds", 300)["grows"] is False
    grown = slope(growing, "fds", 300)
    assert grown["grows"] is True and abs(grown["slope_per_hour"] - 60) < 0.01
    assert slope(warming, "fds", 0)["grows"] is True
    assert slope(warming, "fds", 300)["grows"] is False
    assert slope(flat[:2], "fds", 0) is None  # too few samples to fit
