"""vLLM's pooling runner for the embedding slot: engine arguments and batched embedding."""

from __future__ import annotations

import asyncio
from typing import Any

from vllm.inputs import TokensPrompt
from vllm.pooling_params import PoolingParams
from vllm.v1.engine.async_llm import AsyncLLM

from llm_service.engines.base import EngineConfig


def pooling_engine_args(config: EngineConfig) -> dict[str, Any]:
    """An embedding slot runs vLLM's pooling runner. Its `convert` stays vLLM's "auto": a native
    embedding model pools as it was trained, a decoder (*ForCausalLM, the demo) is converted to
    "embed" (last-token pooling, normalized), as `vllm serve --runner pooling` does."""
    return {"runner": "pooling"} if config.kind == "embedding" else {}


async def _embed_one(llm: AsyncLLM, request_id: str, token_ids: list[int], params: PoolingParams) -> list[float]:
    final = None
    async for output in llm.encode(TokensPrompt(prompt_token_ids=token_ids), params, request_id):
        final = output
    if final is None:
        raise RuntimeError(f"embedding request {request_id} ended without output")
    data = final.outputs.data
    return [float(x) for x in data.tolist()]


async def embed_batch(
    llm: AsyncLLM, request_id: str, inputs: list[list[int]], dimensions: int | None
) -> list[list[float]]:
    """Submit every input at once, so the engine's scheduler batches them; one vector per input.

    vLLM checks `dimensions` against the model (matryoshka models only) and raises ValueError.
    """
    params = PoolingParams(task="embed", dimensions=dimensions)
    tasks = [
        asyncio.ensure_future(_embed_one(llm, f"{request_id}-{index}", ids, params.clone()))
        for index, ids in enumerate(inputs)
    ]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
