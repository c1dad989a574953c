"""vLLM's pooling runner for the retrieval slots: engine arguments, batched embedding and reranking.

Reranking goes through vLLM's own scoring front end (`ScoringIOProcessors`, what `LLM.score` and
`vllm serve`'s /rerank run), chosen by the model's score type: a cross-encoder reads each pair as
one prompt (the tokenizer's pair encoding, a model's score template, token type ids) and its score
is the classifier's; an embedding model (bi-encoder) embeds the query and every document once and
scores a pair as the cosine similarity of the two vectors. Either way the length check against
max_model_len and the score read as `ScoringOutput` does are vLLM's.
"""

from __future__ import annotations

import asyncio
from typing import Any

from vllm.entrypoints.pooling.scoring.io_processor import ScoringIOProcessor, ScoringIOProcessors
from vllm.entrypoints.pooling.scoring.typing import ScoreInput
from vllm.entrypoints.pooling.typing import OfflineOutputsContext, OfflineScoringInputsContext, PoolingEngineInput
from vllm.exceptions import VLLMClientError
from vllm.inputs import TokensPrompt
from vllm.outputs import PoolingRequestOutput, ScoringOutput
from vllm.pooling_params import PoolingParams
from vllm.renderers.chat_utils import ChatTemplateConfig
from vllm.v1.engine.async_llm import AsyncLLM

from llm_service.engines.base import EngineConfig, PairScore

POOLING_KINDS = ("embedding", "rerank")


def pooling_engine_args(config: EngineConfig) -> dict[str, Any]:
    """A retrieval slot runs vLLM's pooling runner. Its `convert` stays vLLM's "auto", as
    `vllm serve --runner pooling` does: a native embedding model (the demo's all-MiniLM-L6-v2,
    pooled as its sentence-transformers modules.json says) or cross-encoder pools as it was
    trained; a decoder (*ForCausalLM) is converted to "embed" (last-token pooling, normalized) and
    a *ForSequenceClassification to "classify"."""
    return {"runner": "pooling"} if config.kind in POOLING_KINDS else {}


# vLLM's score types a rerank slot serves: a classifier over the pair, or the cosine of two embeddings.
SCORE_TYPES = ("cross-encoder", "bi-encoder")


def check_scorer(llm: AsyncLLM, slot: str) -> None:
    """Raise ValueError unless the started engine scores pairs as a cross-encoder or a bi-encoder."""
    score_type = llm.model_config.score_type
    if score_type not in SCORE_TYPES:
        raise ValueError(
            f"slot {slot}: {llm.model_config.model} scores pairs as {score_type}; a rerank slot needs a "
            "cross-encoder (*ForSequenceClassification) or an embedding model"
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
    """Scores (query, document) pairs on one engine with vLLM's scoring front end for its score type."""

    def __init__(self, llm: AsyncLLM) -> None:
        self._llm = llm
        self._io: ScoringIOProcessor = ScoringIOProcessors[llm.model_config.score_type](
            vllm_config=llm.vllm_config, renderer=llm.renderer, chat_template_config=ChatTemplateConfig()
        )

    def _render(self, query: str, documents: list[str]) -> tuple[list[PoolingEngineInput], int]:
        """The engine inputs (a pair each for a cross-encoder; the query, then each document, for a
        bi-encoder) and how many of them are queries."""
        io = self._io
        data = io.valid_inputs(query, list[ScoreInput](documents))
        context = OfflineScoringInputsContext(
            pooling_task=io.pooling_task,
            scoring_data=data,
            pooling_params=PoolingParams(task=io.pooling_task),
            tokenization_kwargs=None,
            lora_request=None,
            chat_template=None,
            priorities=None,
        )
        factory, _ = io.get_request_factory_offline(context)
        queries = 0 if io.pooling_task == "classify" else len(data.data_1)
        rendered = []
        for index, params in enumerate(factory()):
            try:
                rendered.append(io.render(params))
            except (ValueError, VLLMClientError) as exc:  # e.g. longer than max_model_len
                what = "the query" if index < queries else f"document {index - queries}"
                raise ValueError(f"{what}{' with the query' if not queries else ''}: {exc}") from exc
        return rendered, queries

    async def score(self, request_id: str, query: str, documents: list[str]) -> list[PairScore]:
        """One score per document, in the documents' order; all engine inputs as one batch. A pair's
        tokens are those of vLLM's pair output (a bi-encoder's: the query's, a pad, the document's).

        Raises ValueError for an input longer than the model's max_model_len, before any runs.
        """
        rendered, queries = await asyncio.to_thread(self._render, query, documents)
        outputs = await _encode_all(self._llm, request_id, [(r["prompts"], r["params"]) for r in rendered])
        pairs = self._io.post_process_offline(OfflineOutputsContext(outputs=outputs, n_queries=queries))
        return [PairScore(ScoringOutput.from_base(pair.outputs).score, len(pair.prompt_token_ids)) for pair in pairs]
