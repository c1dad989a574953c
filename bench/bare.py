"""The bare engine: an in-process AsyncLLM under the same load as the servers (the ceiling).

    python -m bench.bare SPEC_JSON RESULT_JSON

Builds AsyncLLM with the run's engine arguments and registers a request function that calls
it directly, so vLLM's benchmark client drives it with the same dataset and arrival pattern
(concurrency-limited, each request sent as soon as a slot frees) as the HTTP servers: nothing
in lockstep. Writes the engine's start time and every run's figures to RESULT_JSON.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import aiohttp
from vllm.benchmarks.lib.endpoint_request_func import RequestFuncInput, RequestFuncOutput
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.renderers.inputs.preprocess import parse_model_prompt
from vllm.sampling_params import RequestOutputKind, SamplingParams
from vllm.v1.engine.async_llm import AsyncLLM

from bench import load, throughput
from bench.servers import engine_args

BACKEND = "bare-asyncllm"


class BareRequest:
    """vLLM's request-function shape, answered by an AsyncLLM in this process."""

    def __init__(self, llm: AsyncLLM) -> None:
        self.llm = llm

    async def __call__(
        self, request_func_input: RequestFuncInput, session: aiohttp.ClientSession, pbar: Any = None
    ) -> RequestFuncOutput:
        llm = self.llm
        output = RequestFuncOutput(prompt_len=request_func_input.prompt_len)
        params = SamplingParams(
            max_tokens=request_func_input.output_len,
            temperature=0.0,
            ignore_eos=request_func_input.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
        )
        started = last = time.perf_counter()
        output.start_time = started
        try:
            # Rendered and tokenized as a server's completion request is.
            (prompt,) = await llm.renderer.render_cmpl_async(
                [parse_model_prompt(llm.model_config, request_func_input.prompt)],
                llm.renderer.default_cmpl_tok_params,
            )
            async for out in llm.generate(prompt, params, request_func_input.request_id or str(started)):
                now = time.perf_counter()
                choice = out.outputs[0]
                if choice.token_ids:
                    if output.ttft == 0.0:
                        output.ttft = now - started
                    else:
                        output.itl.append(now - last)
                    last = now
                    output.output_tokens += len(choice.token_ids)
                    output.generated_text += choice.text
                output.prompt_len = len(out.prompt_token_ids or ())
            output.latency = last - started
            output.success = True
        except Exception:
            output.error = traceback.format_exc()
        if pbar is not None:
            pbar.update(1)
        return output


async def drive(llm: AsyncLLM, runs: list[dict[str, Any]], log: Path) -> list[dict[str, Any]]:
    load.register(BACKEND, BareRequest(llm))
    # The client's ready check and /metrics probes go to a closed port on loopback.
    target = load.Target("bare AsyncLLM", BACKEND, "http://127.0.0.1:9", "/bare")
    return await throughput.drive([(target, runs)], log)


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    began = time.perf_counter()
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args()))
    started_in = time.perf_counter() - began
    try:
        results = asyncio.run(drive(llm, spec["runs"], Path(spec["log"])))
    finally:
        llm.shutdown()
    out.write_text(json.dumps({"engine_start_seconds": round(started_in, 1), "runs": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
