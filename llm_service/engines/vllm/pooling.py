"""vLLM's pooling runner for the retrieval slots: engine arguments, batched embedding and reranking.

Reranking goes through vLLM's own cross-encoder front end (`CrossEncoderIOProcessor`, what
`vllm serve`'s /rerank runs): the pair's prompt (the tokenizer's pair encoding, a model's score
template, token type ids), the length check against max_model_len, and the score read as
`ScoringOutput` does.
"""

from __future__ import annotations

import asyncio
from typing import Any

from vllm.entrypoints.pooling.scoring.io_processor import CrossEncoderIOProcessor
from vllm.entrypoints.pooling.typing import PoolingEngineInput, ScoringRenderParams
from vllm.exceptions import VLLMClientError
from vllm.inputs import TokensPrompt
from vllm.outputs import PoolingRequestOutput, ScoringOutput
from vllm.pooling_params import PoolingParams
from vllm.renderers.chat_utils import ChatTemplateConfig
from vllm.renderers.inputs.preprocess import extract_prompt_len
from vllm.v1.engine.async_llm import AsyncLLM

from llm_service.engines.base import EngineConfig, PairScore

POOLING_KINDS = ("embedding", "rerank")


def pooling_engine_args(config: EngineConfig) -> dict[str, Any]:
    """A retrieval slot runs vLLM's pooling runner. Its `convert` stays vLLM's "auto", as
    `vllm serve --runner pooling` does: a native embedding model or cross-encoder pools as it was
    trained; a decoder (*ForCausalLM, the demo) is converted to "embed" (last-token pooling,
    normalized) and a *ForSequenceClassification to "classify" (the rerank demo)."""
    return {"runner": "pooling"} if config.kind in POOLING_KINDS else {}


def check_cross_encoder(llm: AsyncLLM, slot: str) -> None:
    """Raise ValueError unless the started engine scores pairs as a cross-encoder."""
    score_type = llm.model_config.score_type
    if score_type != "cross-encoder":
        raise ValueError(
            f"slot {slot}: {llm.model_config.model} is not a cross-encoder (vLLM scores it as {score_type}); "
            "a rerank slot needs a *ForSequenceClassification model"
        )


async def _encode_one(llm: AsyncLLM, request_id: str, prompt: Any, params: PoolingParams) -> PoolingRequestOutput:
    final = None
    async for output in llm.encode(prompt, params, request_id):
        final = output
    if final is None:
        raise RuntimeError(f"pooling request {request_id} ended without output")
    return final


async def _encode_all(
    llm: AsyncLLM, request_id: str, requests: list[tuple[Any, PoolingParams]]
) -> list[PoolingRequestOutput]:
    """Submit every request at once, so the engine's scheduler batches them; outputs in order."""
    tasks = [
        asyncio.ensure_future(_encode_one(llm, f"{request_id}-{index}", prompt, params))
        for index, (prompt, params) in enumerate(requests)
    ]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


async def embed_batch(
    llm: AsyncLLM, request_id: str, inputs: list[list[int]], dimensions: int | None
) -> list[list[float]]:
    """One vector per input, all inputs as one batch.

    vLLM checks `dimensions` against the model (matryoshka models only) and raises ValueError.
    """
    params = PoolingParams(task="embed", dimensions=dimensions)
    outputs = await _encode_all(
        llm, request_id, [(TokensPrompt(prompt_token_ids=ids), params.clone()) for ids in inputs]
    )
    return [[float(x) for x in output.outputs.data.tolist()] for output in outputs]


class PairScorer:
    """Scores (query, document) pairs on one cross-encoder engine with vLLM's scoring front end."""

    def __init__(self, llm: AsyncLLM) -> None:
        self._llm = llm
        self._io = CrossEncoderIOProcessor(
            vllm_config=llm.vllm_config, renderer=llm.renderer, chat_template_config=ChatTemplateConfig()
        )

    def _render(self, query: str, documents: list[str]) -> list[PoolingEngineInput]:
        params = PoolingParams(task="classify")
        tok_params = self._llm.renderer.default_cmpl_tok_params
        rendered = []
        for index, document in enumerate(documents):
            try:
                rendered.append(
                    self._io.render(
                        ScoringRenderParams(
                            data_1=query,
                            data_2=document,
                            chat_template=None,
                            max_tokens_per_query=0,
                            max_tokens_per_doc=0,
                            tok_params=tok_params,
                            prompt_extras=None,
                            skip_mm_cache=False,
                            params=params,
                            lora_requests=None,
                            priorities=0,
                        )
                    )
                )
            except (ValueError, VLLMClientError) as exc:  # e.g. the pair is longer than max_model_len
                raise ValueError(f"document {index} with the query: {exc}") from exc
        return rendered

    async def score(self, request_id: str, query: str, documents: list[str]) -> list[PairScore]:
        """One score per document, in the documents' order; all pairs as one batch.

        Raises ValueError for a pair longer than the model's max_model_len, before any pair runs.
        """
        rendered = await asyncio.to_thread(self._render, query, documents)
        outputs = await _encode_all(self._llm, request_id, [(r["prompts"], r["params"]) for r in rendered])
        model_config = self._llm.model_config
        return [
            PairScore(ScoringOutput.from_base(output.outputs).score, extract_prompt_len(model_config, r["prompts"]))
            for output, r in zip(outputs, rendered, strict=True)
        ]
