"""Prompts of a workload, written once per run so every server gets exactly the same text."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from bench.plan import SEED, Workload

_WORD = re.compile(r"^ [a-z]{3,10}$")


def vocabulary(tokenizer: Any) -> list[str]:
    """Plain lower-case words that are one token each (with their leading space)."""
    words = []
    for token_id in range(min(len(tokenizer), 49152)):
        piece = tokenizer.decode([token_id])
        if _WORD.match(piece):
            words.append(piece)
    return words


def prompt_text(workload: Workload, rng: random.Random, words: list[str]) -> str:
    low = int(workload.input_len * (1 - workload.input_range))
    high = int(workload.input_len * (1 + workload.input_range))
    length = rng.randint(low, high)
    if workload.name == "rag":
        # A retrieved context, then the question about it.
        context = "".join(rng.choice(words) for _ in range(length - 24)).strip()
        question = "".join(rng.choice(words) for _ in range(12)).strip()
        return f"Answer from the context below.\n\nContext:\n{context}\n\nQuestion:{question}?"
    return "".join(rng.choice(words) for _ in range(length)).strip() + "?"


def write_prompts(workload: Workload, count: int, tokenizer: Any, path: Path) -> Path:
    """A JSONL file for vLLM's `custom` dataset: {"prompt", "output_tokens"} per line."""
    rng = random.Random(f"{SEED}-{workload.name}")
    words = vocabulary(tokenizer)
    with path.open("w") as out:
        for _ in range(count):
            line = {"prompt": prompt_text(workload, rng, words), "output_tokens": workload.output_len}
            out.write(json.dumps(line) + "\n")
    return path
