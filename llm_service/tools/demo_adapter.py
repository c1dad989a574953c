"""python -m llm_service.tools.demo_adapter: a small random-weight PEFT LoRA adapter for the demo model.

Its weights are random but seeded (the same files on every machine) and large enough that the
adapter's answers differ from the base model's at temperature 0: it proves the LoRA path end to
end, it is not trained. Written in PEFT's on-disk format (adapter_config.json and
adapter_model.safetensors), which `vllm serve --lora-modules` and the service both read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llm_service.config.slots import DEMO_ADAPTER_DIR, DEMO_MODEL_DIR

RANK = 8
ALPHA = 16
TARGETS = ("q_proj", "v_proj")
SEED = 24
# Standard deviation of both factors: the update B @ A * ALPHA / RANK is then of the order of the
# base weights (std ~0.05), enough to change greedy answers without turning them into noise.
STD = 0.1


def build_adapter(base: Path, output: Path) -> Path:
    """Write the adapter for the checkpoint at `base` (a Llama-architecture config.json) to `output`."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    out_dims = {"q_proj": config["num_attention_heads"] * head_dim,
                "v_proj": config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim}
    generator = torch.Generator().manual_seed(SEED)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module in TARGETS:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, hidden, generator=generator) * STD
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_dims[module], RANK, generator=generator) * STD
    output.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(output / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": RANK,
        "lora_alpha": ALPHA,
        "lora_dropout": 0.0,
        "target_modules": list(TARGETS),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
    }
    (output / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8")
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_service.tools.demo_adapter", description=__doc__)
    parser.add_argument("--base", type=Path, default=DEMO_MODEL_DIR, help="the demo model's folder")
    parser.add_argument("--output", type=Path, default=DEMO_ADAPTER_DIR, help="where the adapter goes")
    args = parser.parse_args(argv)
    if not (args.base / "config.json").exists():
        parser.error(f"{args.base} has no config.json: build the demo model first "
                     "(python -m llm_service.tools.demo_model)")
    build_adapter(args.base, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
