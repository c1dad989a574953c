"""Load from vLLM's own benchmark client (`vllm.benchmarks.serve`), for every target.

The OpenAI endpoints use its request functions as they are. /generate (ours) and the bare
in-process engine get a request function here each, registered beside vLLM's, so arrival
pattern, dataset, timing and statistics are vLLM's for every target.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from vllm.benchmarks import serve as vllm_bench
from vllm.benchmarks.lib.endpoint_request_func import (
    ASYNC_REQUEST_FUNCS,
    OPENAI_COMPATIBLE_BACKENDS,
    RequestFuncInput,
    RequestFuncOutput,
)
from vllm.utils.argparse_utils import FlexibleArgumentParser

from bench.plan import MODEL, SEED

GENERATE_BACKEND = "llm-service-generate"
# The figures a run keeps from vLLM's result.
FIGURES = (
    "completed", "failed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
    "output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms", "median_tpot_ms",
    "median_e2el_ms", "p99_e2el_ms",
)  # fmt: skip


@dataclass(frozen=True)
class Target:
    """One server endpoint under load: vLLM's backend name for it, and how prompts are sent."""

    name: str  # e.g. "ours /v1/completions"
    backend: str  # a key of ASYNC_REQUEST_FUNCS
    base_url: str
    endpoint: str
    chat: bool = False  # the server renders the chat template (else the client does)
    headers: tuple[str, ...] = ()


async def generate_request(
    request_func_input: RequestFuncInput, session: aiohttp.ClientSession, pbar: Any = None
) -> RequestFuncOutput:
    """vLLM's request function for ours' POST /generate (SSE `delta` events, then `done`)."""
    payload: dict[str, Any] = {
        "model": request_func_input.model_name or request_func_input.model,
        "prompt": request_func_input.prompt,
        "max_tokens": request_func_input.output_len,
        "stream": True,
        "ignore_eos": request_func_input.ignore_eos,
    }
    payload.update({k: v for k, v in (request_func_input.extra_body or {}).items() if k in ("temperature", "top_p")})
    headers = dict(request_func_input.extra_headers or {})
    if request_func_input.request_id:
        headers["x-request-id"] = request_func_input.request_id
    output = RequestFuncOutput(prompt_len=request_func_input.prompt_len)
    started = last = time.perf_counter()
    output.start_time = started
    try:
        async with session.post(request_func_input.api_url, json=payload, headers=headers) as response:
            if response.status != 200:
                output.error = f"{response.status} {await response.text()}"
                return output
            buffer = ""
            async for chunk in response.content.iter_any():
                buffer += chunk.decode()
                while "\n\n" in buffer:
                    message, buffer = buffer.split("\n\n", 1)
                    if not message.startswith("data: "):
                        continue
                    event = json.loads(message[6:])
                    now = time.perf_counter()
                    if event["type"] == "delta":
                        if output.ttft == 0.0:
                            output.ttft = now - started
                        else:
                            output.itl.append(now - last)
                        last = now
                        output.generated_text += event["text"]
                    elif event["type"] == "done":
                        output.output_tokens = event["usage"]["completion_tokens"]
                        output.prompt_len = event["usage"]["prompt_tokens"]
                        output.success = True
                    else:
                        output.error = json.dumps(event)
            output.latency = last - started
    except Exception:
        output.error = traceback.format_exc()
    if pbar is not None:
        pbar.update(1)
    return output


def register(backend: str, request_func: Any) -> None:
    """Make `backend` a choice of vLLM's benchmark client (before its argument parser is built),
    one that takes sampling parameters (temperature) as its OpenAI backends do."""
    ASYNC_REQUEST_FUNCS[backend] = request_func
    if backend not in OPENAI_COMPATIBLE_BACKENDS:
        OPENAI_COMPATIBLE_BACKENDS.append(backend)


register(GENERATE_BACKEND, generate_request)


def client_args(
    target: Target, served_name: str, dataset: Path, prompts: int, concurrency: int, output_len: int, label: str
) -> list[str]:
    """The command line of `vllm bench serve` for one run."""
    args = [
        "--backend", target.backend, "--base-url", target.base_url, "--endpoint", target.endpoint,
        "--model", str(MODEL), "--served-model-name", served_name,
        "--dataset-name", "custom", "--dataset-path", str(dataset), "--custom-output-len", str(output_len),
        "--num-prompts", str(prompts), "--max-concurrency", str(concurrency), "--request-rate", "inf",
        "--seed", str(SEED), "--temperature", "0", "--ignore-eos", "--disable-tqdm",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--request-id-prefix", f"{label}-", "--save-detailed",
    ]  # fmt: skip
    if target.chat:
        args.append("--skip-chat-template")
    for header in target.headers:
        args += ["--header", header]
    return args


async def run(
    target: Target,
    served_name: str,
    dataset: Path,
    prompts: int,
    concurrency: int,
    output_len: int,
    label: str,
    log: Path,
) -> dict[str, Any]:
    """One benchmark run; vLLM's printout goes to `log`, the figures are returned."""
    parser = FlexibleArgumentParser()
    vllm_bench.add_cli_args(parser)
    args = parser.parse_args(client_args(target, served_name, dataset, prompts, concurrency, output_len, label))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            result = await vllm_bench.main_async(args)
    finally:
        with log.open("a") as out:
            out.write(f"=== {target.name} {label}\n{printed.getvalue()}\n")
    figures = {key: result.get(key) for key in FIGURES}
    errors = [e for e in result.get("errors", []) if e]
    if errors:
        figures["first_error"] = errors[0][-500:]
    return figures

