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
# What ours picks by itself on an x86 CPU without AVX-512 BF16 (bf16 is emulated there); the peers
# are told the same.
DTYPE = "float32"


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


SECTIONS = ("bare", "vllm-serve", "ours", "swap")
# What the `ours` section measures besides throughput.
OURS_PARTS = ("head_of_line", "cache", "coalescing", "flood", "litellm")


@dataclass(frozen=True)
class Plan:
    name: str
    workloads: tuple[Workload, ...]
    # Workloads that /v1/chat/completions (both servers) and ours' /generate run besides
    # /v1/completions, at `other_levels` of concurrency (all of the workload's when empty).
    chat_workloads: tuple[str, ...]
    generate_workloads: tuple[str, ...]
    other_levels: tuple[int, ...] = ()
    sections: tuple[str, ...] = SECTIONS
    ours_parts: tuple[str, ...] = OURS_PARTS
    cache_levels: tuple[int, ...] = (1, 16, 64)
    cache_requests: int = 2000
    litellm_requests: int = 300
    coalesce_requests: int = 16
    swap_requests: int = 4
    hol_streams: int = 4
    hol_stream_tokens: int = 128
    hol_rag_prompts: int = 4
    # The bare engine runs levels up to this (0 = all): past the batch size the engine saturates
    # (c=32 and c=128 give the same tokens/s) and its c=128 run costs 3.5 minutes.
    bare_max_concurrency: int = 0

    def bare_levels(self, workload: Workload) -> tuple[int, ...]:
        top = self.bare_max_concurrency
        return tuple(c for c in workload.levels if not top or c <= top)

    def preload(self) -> tuple[str, ...]:
        """The slots ours loads at start: the workloads' and, for head-of-line, standard and longctx."""
        slots = {w.slot for w in self.workloads}
        if "head_of_line" in self.ours_parts:
            slots |= {"standard", "longctx"}
        return tuple(sorted(slots))


# name -> (slot, input tokens, +- share of them): short chat, and RAG's 1500-3000 tokens of context.
SHAPES = {"short-chat": ("standard", 100, 0.2), "rag": ("longctx", 2250, 0.33)}


def workload(
    name: str, out: int, levels: tuple[int, ...], waves: float = 1.0, min_prompts: int = 2, slot: str = ""
) -> Workload:
    default_slot, input_len, input_range = SHAPES[name]
    return Workload(name, slot or default_slot, input_len, input_range, out, levels, waves, min_prompts)


# Sized for under 30 minutes on 2 quiet cores (float32 engines): one wave of prompts per level.
# RAG stops at 8: prefill dominates it on a CPU (a few hundred prompt tokens/s), so 32 prompts of
# 2250 tokens cost about 5 minutes per target; 128 would measure a queue, not the server. The bare
# engine stops at 32 (it is saturated there; its c=128 run would push the form past 30 minutes).
FULL = Plan(
    name="full",
    workloads=(workload("short-chat", 128, (1, 8, 32, 128)), workload("rag", 200, (1, 8), min_prompts=1)),
    chat_workloads=("short-chat",),
    generate_workloads=("short-chat",),
    other_levels=(1, 8),
    cache_requests=1000,
    hol_streams=2,
    hol_stream_tokens=64,
    hol_rag_prompts=2,
    bare_max_concurrency=32,
)
# Under 5 minutes: engine starts and stops take about 2.5 of them, so short chat only (one RAG
# prompt costs about 11 s of prefill per server), one engine in ours, no head-of-line (it needs
# two), slot swaps (two more loads) or LiteLLM; short outputs.
QUICK = Plan(
    name="quick",
    workloads=(workload("short-chat", 32, (1, 8), min_prompts=1),),
    chat_workloads=("short-chat",),
    generate_workloads=("short-chat",),
    other_levels=(8,),
    sections=("bare", "vllm-serve", "ours"),
    ours_parts=("cache", "coalescing"),
    cache_requests=500,
    coalesce_requests=8,
)
# One request per setting: keeps the harness from rotting (the test suite runs it).
SMOKE = Plan(
    name="smoke",
    workloads=(workload("short-chat", 8, (1,), min_prompts=1), workload("rag", 8, (1,), min_prompts=1)),
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
    ours_parts=("head_of_line", "cache", "coalescing"),
)
PLANS = {p.name: p for p in (FULL, QUICK, SMOKE)}
