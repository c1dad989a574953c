"""DEPLOYMENT.md's card table, row by row, as `python -m llm_service plan --json` computes it.

`python -m tests.deploy.card_table` prints the rows to paste; test_card_table keeps them equal.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any
from unittest import mock

from llm_service.tools import plan as cli

# (GPU, GiB the card reports as torch's total_memory, settings other than the defaults)
CARDS: list[tuple[str, float, dict[str, str]]] = [
    ("L4", 22.05, {}),
    ("A10G", 22.19, {}),
    ("RTX 4090", 23.52, {}),
    ("RTX 4090, the guide's `0.75`, preload `standard`", 23.52,
     {"LLM_GPU_MEMORY_UTILIZATION": "0.75", "LLM_PRELOAD_MODELS": "standard"}),
    ("A100 40GB", 39.50, {}),
    ("L40S", 44.39, {}),
    ("A100 80GB", 79.15, {}),
    ("H100 80GB", 79.19, {}),
    ("H100 80GB, the guide's `0.90`, preload all three", 79.19,
     {"LLM_GPU_MEMORY_UTILIZATION": "0.90", "LLM_PRELOAD_MODELS": "standard,longctx,multimodal"}),
    ("H200", 139.80, {}),
    ("2 x L4, `LLM_TENSOR_PARALLEL_SIZE=2`", 22.05, {"LLM_TENSOR_PARALLEL_SIZE": "2"}),
]

HEADER = (
    "| GPU | Reports | standard | longctx | multimodal | Preloaded | Headroom |\n"
    "| --- | --- | --- | --- | --- | --- | --- |"
)


def plan_json(gib: float, settings: dict[str, str]) -> dict[str, Any]:
    """The plan of the default models on one card, offline, from the bundled configs only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "HF_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE="/nonexistent-hub-cache", **settings)
    out = io.StringIO()
    with mock.patch.dict(os.environ, env, clear=True):
        status = cli.main(["--device", "cuda", "--device-memory", f"{gib}GiB", "--offline", "--json"], out)
    assert status in (0, 1)
    result: dict[str, Any] = json.loads(out.getvalue())
    return result


def _slot_cell(slot: dict[str, Any]) -> str:
    length = slot["max_model_len"]
    context = f"**{length}**" if length < slot["requested_max_model_len"] else str(length)
    kv = slot["kv_tokens"]
    where = "preloaded" if slot["preload"] else "on demand"
    return f"{slot['share']:.2f}, context {context}, {kv / 1000:.1f}k KV tokens, {where}"


def row(name: str, gib: float, settings: dict[str, str]) -> str:
    plan = plan_json(gib, settings)
    slots = {s["slot"]: s for s in plan["slots"]}
    device = plan["device"]
    verdict = "fit" if plan["fits"] else "DOES NOT FIT"
    cells = [
        name,
        f"{gib:.2f} GiB",
        *(_slot_cell(slots[name]) for name in ("standard", "longctx", "multimodal")),
        f"{plan['preloaded_share']:.2f} of {device['budget']:.2f}: {verdict}",
        f"{device['headroom_bytes'] / 1024**3:.1f} GiB",
    ]
    return "| " + " | ".join(cells) + " |"


def table() -> str:
    return "\n".join([HEADER, *(row(*card) for card in CARDS)])


if __name__ == "__main__":
    import sys

    sys.stdout.write(table() + "\n")
