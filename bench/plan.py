"""What one benchmark run measures: workloads, concurrency levels and sizes of the full, quick and smoke forms."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
SEED = 0

# Engine arguments every server gets (bare engine, `vllm serve`, each slot of ours).
MAX_MODEL_LEN = 4096
MEMORY_SHARE = 0.15
KV_CACHE_BYTES = 1 << 30


@dataclass(frozen=True)
class Workload:
    """Prompts of `input_len` tokens (+-`input_range` of it) asking for `output_len` tokens, on `slot`."""

    name: str
    slot: str
    input_len: int
    input_range: float
    output_len: int
    levels: tuple[int, ...]
    # Prompts sent at concurrency c: max(min_prompts, waves * c).
    waves: float = 1.0
    min_prompts: int = 2

    def prompts_at(self, concurrency: int) -> int:
        return max(self.min_prompts, int(self.waves * concurrency))


@dataclass(frozen=True)
class Plan:
    name: str
    workloads: tuple[Workload, ...]
    # Workloads that /v1/chat/completions (both servers) and ours' /generate run besides
    # /v1/completions, at `other_levels` of concurrency (all of the workload's when empty).
    chat_workloads: tuple[str, ...]
    generate_workloads: tuple[str, ...]
    other_levels: tuple[int, ...] = ()
    cache_levels: tuple[int, ...] = (1, 16, 64)
    cache_requests: int = 2000
    litellm_requests: int = 300
    coalesce_requests: int = 16
    swap_requests: int = 4
    hol_streams: int = 4
    hol_stream_tokens: int = 128
    hol_rag_prompts: int = 4
    litellm: bool = True


def short_chat(out: int, levels: tuple[int, ...], waves: float = 1.0, min_prompts: int = 2) -> Workload:
    return Workload("short-chat", "standard", 100, 0.2, out, levels, waves, min_prompts)


def rag(out: int, levels: tuple[int, ...], waves: float = 1.0, min_prompts: int = 2) -> Workload:
    # 1500-3000 tokens of context.
    return Workload("rag", "longctx", 2250, 0.33, out, levels, waves, min_prompts)


# Sized to finish in about 30 minutes on 2 quiet cores: one wave of prompts per level; RAG stops at
# 32 because 1 GiB of KV cache holds about 18 of its prompts at once (128 would measure a queue).
FULL = Plan(
    name="full",
    workloads=(short_chat(128, (1, 8, 32, 128)), rag(200, (1, 8, 32))),
    chat_workloads=("short-chat",),
    generate_workloads=("short-chat",),
    other_levels=(1, 8, 32),
)
QUICK = Plan(
    name="quick",
    # Prefill dominates RAG on a CPU (about 700 prompt tokens/s on one quiet core): one prompt.
    workloads=(short_chat(64, (1, 8)), rag(64, (1,), min_prompts=1)),
    chat_workloads=("short-chat",),
    generate_workloads=("short-chat",),
    cache_requests=1000,
    litellm_requests=200,
    coalesce_requests=8,
    swap_requests=1,
    hol_streams=2,
    hol_stream_tokens=48,
    hol_rag_prompts=2,
)
# One request per setting: keeps the harness from rotting (the test suite runs it).
SMOKE = Plan(
    name="smoke",
    workloads=(short_chat(8, (1,), min_prompts=1), rag(8, (1,), min_prompts=1)),
    chat_workloads=("short-chat",),
    generate_workloads=("short-chat",),
    cache_levels=(1, 4),
    cache_requests=100,
    litellm_requests=10,
    coalesce_requests=4,
    swap_requests=1,
    hol_streams=1,
    hol_stream_tokens=8,
    hol_rag_prompts=1,
    litellm=False,
)
PLANS = {p.name: p for p in (FULL, QUICK, SMOKE)}
