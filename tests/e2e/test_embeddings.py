"""/v1/embeddings on the real engine: all-MiniLM-L6-v2 (the demo embedding model) behind vLLM's pooling
runner, in the retrieval service (only the retrieval slots loaded), through the openai SDK, LangChain
and plain HTTP."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from langchain_openai import OpenAIEmbeddings

from tests.metrics_text import metric

from .conftest import ServiceProcess

HIDDEN_SIZE = 384  # all-MiniLM-L6-v2's: mean pooling over the tokens' hidden states
# Ten one-line facts and a plain question whose answer is one of them (the LlamaIndex check,
# where last-token pooling over the chat model ranked the Nile sentence first).
FACTS = [
    "The Nile is the longest river in Africa.",
    "Paris is the capital of France.",
    "Photosynthesis turns sunlight into chemical energy in plants.",
    "Mount Everest is the highest mountain on Earth.",
    "Water boils at 100 degrees Celsius at sea level.",
    "The Great Wall of China is thousands of kilometres long.",
    "Shakespeare wrote Hamlet and Macbeth.",
    "The Pacific is the largest ocean.",
    "Honey bees live in colonies with one queen.",
    "The speed of light is about 300,000 kilometres per second.",
]
QUESTION, ANSWER = "What is the capital of France?", 1


@pytest.fixture(scope="module")
def embedder(retrieval_service: ServiceProcess) -> ServiceProcess:
    return retrieval_service


@pytest.fixture(scope="module")
def client(embedder: ServiceProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=embedder.base_url + "/v1", api_key="unused", timeout=300, max_retries=0) as sdk:
        yield sdk


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(x * x for x in vector))


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / (norm(a) * norm(b))


def test_sdk_shapes_normalization_and_usage(client: openai.OpenAI) -> None:
    texts = ["The cat sat on the mat.", "A kitten rested on the rug.", "Quarterly revenue rose by 4%."]
    # The SDK asks for base64 by default and decodes it: that path and float must agree.
    b64 = client.embeddings.create(model="embedding", input=texts, extra_headers={"Cache-Control": "no-cache"})
    floats = client.embeddings.create(model="embedding", input=texts, encoding_format="float")
    assert [d.index for d in b64.data] == [0, 1, 2]
    for a, b in zip(b64.data, floats.data, strict=True):
        assert len(a.embedding) == HIDDEN_SIZE
        assert abs(norm(a.embedding) - 1) < 1e-3
        assert a.embedding == pytest.approx(b.embedding, abs=1e-6)
    assert b64.usage.prompt_tokens == b64.usage.total_tokens > len(texts)
    vectors = [d.embedding for d in floats.data]
    assert cosine(vectors[0], vectors[0]) == pytest.approx(1.0, abs=1e-5)
    assert cosine(vectors[0], vectors[1]) < 0.9999  # different texts, different vectors


def test_the_question_ranks_its_fact_first(client: openai.OpenAI) -> None:
    vectors = [d.embedding for d in client.embeddings.create(model="embedding", input=[QUESTION, *FACTS]).data]
    scores = [cosine(vectors[0], fact) for fact in vectors[1:]]
    ranking = sorted(range(len(FACTS)), key=lambda i: -scores[i])
    assert ranking[0] == ANSWER, [FACTS[i] for i in ranking[:3]]
    # sentence-transformers' own all-MiniLM-L6-v2 gives 0.86 here: mean pooling and normalizing as its
    # modules.json says, not another pooling of the same weights.
    assert scores[ANSWER] == pytest.approx(0.86, abs=0.01)
    assert max(s for i, s in enumerate(scores) if i != ANSWER) < 0.3


def test_batch_equals_single(client: openai.OpenAI) -> None:
    nocache = {"Cache-Control": "no-cache"}
    texts = [f"sentence number {i} about topic {i % 3}" for i in range(16)]
    batch = client.embeddings.create(model="embedding", input=texts, encoding_format="float", extra_headers=nocache)
    single = client.embeddings.create(model="embedding", input=texts[5], encoding_format="float", extra_headers=nocache)
    assert len(batch.data) == 16
    assert batch.data[5].embedding == pytest.approx(single.data[0].embedding, abs=1e-3)


def test_token_id_input(client: openai.OpenAI) -> None:
    tokens = client.embeddings.create(
        model="embedding", input=[[1, 504, 2295, 30], [1, 504]], encoding_format="float",
        extra_headers={"Cache-Control": "no-cache"},
    )
    assert len(tokens.data) == 2 and tokens.usage.prompt_tokens == 6
    assert tokens.data[0].embedding != tokens.data[1].embedding


def test_cache_hits_per_input(client: openai.OpenAI, embedder: ServiceProcess) -> None:
    def hits() -> float:
        text = httpx.get(embedder.base_url + "/metrics", timeout=30).text
        return metric(text, "llm_embedding_cache_hits_total", model="embedding")

    seen = [f"cache test {time.monotonic_ns()} item {i}" for i in range(10)]
    first = client.embeddings.create(model="embedding", input=seen, encoding_format="float")
    before = hits()
    again = client.embeddings.create(model="embedding", input=[*seen[:9], "a new one"], encoding_format="float")
    assert hits() - before == 9
    assert [d.embedding for d in again.data[:9]] == [d.embedding for d in first.data[:9]]
    assert again.usage.prompt_tokens > 0


def test_langchain_openai_embeddings(embedder: ServiceProcess) -> None:
    lc = OpenAIEmbeddings(
        model="embedding", base_url=embedder.base_url + "/v1", api_key="unused",  # type: ignore[arg-type]
        check_embedding_ctx_length=False, max_retries=0,
    )
    docs = lc.embed_documents(["first document", "second document"])
    query = lc.embed_query("first document")
    assert len(docs) == 2 and len(docs[0]) == HIDDEN_SIZE
    assert cosine(docs[0], query) == pytest.approx(1.0, abs=1e-3)


def test_errors(client: openai.OpenAI, embedder: ServiceProcess) -> None:
    with pytest.raises(openai.BadRequestError, match="at most 128"):
        client.embeddings.create(model="embedding", input=["x"] * 129)
    with pytest.raises(openai.BadRequestError, match="at most 256"):
        client.embeddings.create(model="embedding", input="word " * 600)
    with pytest.raises(openai.BadRequestError, match=r"dimensions|matryoshka"):
        client.embeddings.create(model="embedding", input="x", dimensions=64)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="x")
    models = {m["id"]: m for m in httpx.get(embedder.base_url + "/v1/models", timeout=30).json()["data"]}
    assert models["embedding"]["kind"] == "embedding" and models["embedding"]["state"] == "loaded"


def test_repeated_batch_is_served_from_the_cache(client: openai.OpenAI, embedder: ServiceProcess) -> None:
    """Batch 1 and 64 through the engine, then the same 64 again: all hits, no engine input.
    Prints the measured throughput (run with -s); asserts only what the cache must do."""

    def misses() -> float:
        text = httpx.get(embedder.base_url + "/metrics", timeout=30).text
        return metric(text, "llm_embedding_cache_misses_total", model="embedding")

    stamp = time.monotonic_ns()
    texts = [f"throughput {stamp} passage {i}: retrieval augmented generation needs fast embeddings" for i in range(64)]
    started = time.perf_counter()
    for text in texts[:16]:
        client.embeddings.create(model="embedding", input=text, extra_headers={"Cache-Control": "no-store"})
    single = 16 / (time.perf_counter() - started)
    started = time.perf_counter()
    first = client.embeddings.create(model="embedding", input=texts, encoding_format="float")
    first_seconds = time.perf_counter() - started
    before = misses()
    started = time.perf_counter()
    again = client.embeddings.create(model="embedding", input=texts, encoding_format="float")
    again_seconds = time.perf_counter() - started
    engine_inputs = misses() - before
    assert engine_inputs == 0
    assert [d.embedding for d in again.data] == [d.embedding for d in first.data]
    print(
        f"\nembedding inputs/s: batch 1 {single:.1f}, batch 64 {64 / first_seconds:.1f}; repeated batch 64: "
        f"{first_seconds * 1000:.0f} ms then {again_seconds * 1000:.0f} ms ({64 / again_seconds:.1f} inputs/s), "
        f"{engine_inputs:.0f} engine inputs on the second call"
    )
