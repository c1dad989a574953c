"""POST /generate, /health and /metrics on the real engine and the demo model."""

from __future__ import annotations

import json
import time

import httpx

from tests.metrics_text import metric

from .conftest import ServiceProcess, wait_for

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


def test_capital_of_france(client: httpx.Client) -> None:
    r = client.post("/generate", json={"messages": CAPITAL, "temperature": 0, "max_tokens": 32})
    assert r.status_code == 200, r.text
    body = r.json()
    assert "Paris" in body["text"]
    assert body["model"] == "standard" and body["model_id"].endswith("SmolLM2-135M-Instruct")
    assert body["finish_reason"] in {"stop", "length"}
    usage = body["usage"]
    assert usage["prompt_tokens"] > 5 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < body["timings"]["time_to_first_token"] <= body["timings"]["total"]
    assert r.headers["x-request-id"] == body["id"]


def test_stream_gives_the_same_text(client: httpx.Client) -> None:
    payload = {"messages": CAPITAL, "temperature": 0, "max_tokens": 32, "cache": {"no_cache": True}}
    plain = client.post("/generate", json=payload).json()
    events = []
    with client.stream("POST", "/generate", json={**payload, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    deltas = [e for e in events if e["type"] == "delta"]
    assert len(deltas) > 1  # really streamed, token by token
    assert "".join(e["text"] for e in deltas) == plain["text"]
    assert events[-1]["type"] == "done"
    assert events[-1]["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]


def test_raw_prompt_and_stop_sequence(client: httpx.Client) -> None:
    r = client.post(
        "/generate",
        json={"prompt": "1, 2, 3, 4,", "temperature": 0, "max_tokens": 24, "stop": ["7"]},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert "7" not in body["text"] and body["finish_reason"] == "stop"


def test_max_tokens_length_finish(client: httpx.Client) -> None:
    body = client.post(
        "/generate", json={"messages": CAPITAL, "temperature": 0, "max_tokens": 2}
    ).json()
    assert body["usage"]["completion_tokens"] == 2 and body["finish_reason"] == "length"


def test_error_cases_use_the_envelope(client: httpx.Client) -> None:
    cases = [
        ({"model": "huge", "prompt": "hi"}, 404, "standard, longctx, multimodal"),
        ({"temperature": 0}, 400, "exactly one of 'prompt' or 'messages'"),
        ({"prompt": "hi", "top_p": 0}, 400, "top_p"),
        ({"prompt": "hi", "max_tokens": 5000}, 400, "context length of 2048"),
        ({"prompt": "Paris " * 3000, "max_tokens": 8}, 400, "context length of 2048"),
    ]
    for payload, status, fragment in cases:
        r = client.post("/generate", json=payload)
        assert r.status_code == status, (payload, r.text)
        error = r.json()["error"]
        assert fragment in error["message"], (payload, error)
        assert set(error) >= {"type", "message"}


def test_health_reports_slots(client: httpx.Client) -> None:
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] in {"healthy", "degraded"}
    models = body["dependencies"]["models"]
    assert set(models) == {"standard", "longctx", "multimodal"}
    assert models["standard"]["state"] == "loaded" and models["standard"]["pinned"] is True
    assert models["standard"]["memory_share"] == 0.15
    assert models["standard"]["max_model_len"] == 2048
    assert client.get("/health/live").status_code == 200
    assert client.get("/health/ready").status_code == 200


def test_metrics_counters_move(client: httpx.Client) -> None:
    before = client.get("/metrics").text
    r = client.post(
        "/generate",
        json={"messages": CAPITAL, "temperature": 0.7, "max_tokens": 8},  # not cacheable: runs the engine
    )
    assert r.status_code == 200
    completion = r.json()["usage"]["completion_tokens"]
    after = client.get("/metrics").text
    assert metric(after, "llm_model_loaded", model="standard") == 1
    success_before = metric(before, "llm_requests_total", model="standard", status="success")
    assert metric(after, "llm_requests_total", model="standard", status="success") == success_before + 1
    tokens_before = metric(before, "llm_tokens_generated_total", model="standard")
    assert metric(after, "llm_tokens_generated_total", model="standard") == tokens_before + completion
    assert metric(after, "llm_inference_duration_seconds_count", model="standard") > metric(
        before, "llm_inference_duration_seconds_count", model="standard"
    )
    assert metric(after, "llm_model_load_duration_seconds_count", model="standard") == 1
    assert "vllm" not in after


def test_one_access_line_per_request(client: httpx.Client, service: ServiceProcess) -> None:
    """Our access line carries the request id; uvicorn's would be a second line per request."""
    request_id = f"access-{time.time_ns()}"
    # (health probes and /metrics are not logged at all)
    assert client.get("/v1/models", headers={"X-Request-ID": request_id}).status_code == 200

    def lines() -> list[dict[str, str]]:
        text = service.log_path.read_text().splitlines()
        return [json.loads(line) for line in text if request_id in line and line.startswith("{")]

    # The line is written after the response has gone out.
    wait_for(lambda: bool(lines()), 10, "the request's access line")
    time.sleep(0.5)  # a second line, if any, is written right after the first
    assert [(line["logger"], line["event"]) for line in lines()] == [("llm_service.access", "request_finished")]
    assert not any('"uvicorn.access"' in line for line in service.log_path.read_text().splitlines())
