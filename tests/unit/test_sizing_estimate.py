"""Memory estimates from config.json: parameters, quantization, head_dim, sliding windows, TP."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from llm_service.config.settings import PRODUCTION_MODELS
from llm_service.sizing.estimate import (
    BLOCK_SIZE,
    GIB,
    ModelShape,
    kv_dtype_bytes,
    model_shape,
    quantization_of,
)
from llm_service.sizing.model_files import BUNDLED_CONFIGS, bundled_config, layout_engine_args, model_metadata

from .hf_cache import add_model


def shape_of(slot: str) -> ModelShape:
    config = bundled_config(PRODUCTION_MODELS[slot])
    assert config is not None, f"no bundled config for {PRODUCTION_MODELS[slot]}"
    shape = model_shape(config)
    assert shape is not None
    return shape


def test_every_default_model_has_a_bundled_config() -> None:
    assert {p.stem for p in BUNDLED_CONFIGS.glob("*.json")} == {
        m.replace("/", "--") for m in PRODUCTION_MODELS.values()
    }


@pytest.mark.parametrize(
    ("slot", "params_b", "weights_gib"),
    [("standard", 8.03, 5.33), ("longctx", 12.25, 7.78), ("multimodal", 12.19, 8.45)],
)
def test_parameters_and_weights_come_from_the_architecture(slot: str, params_b: float, weights_gib: float) -> None:
    # Published sizes: Llama 3.1 8B has 8.03 B parameters, Mistral NeMo 12.2 B, Gemma 3 12B 12.2 B;
    # their AWQ builds keep embeddings (and Gemma's vision tower) in 16 bits.
    shape = shape_of(slot)
    assert shape.params / 1e9 == pytest.approx(params_b, abs=0.02)
    assert shape.weight_bytes() / GIB == pytest.approx(weights_gib, abs=0.02)


def test_awq_weights_are_a_quarter_of_bf16_plus_scales_and_zeros() -> None:
    shape = shape_of("standard")
    assert shape.quantization.method == "awq" and shape.quantization.bits == 4
    assert shape.quantization.group_size == 128
    # 4 bits per weight, one fp16 scale and one 4-bit zero per 128 weights.
    assert shape.quantization.bytes_per_param() == pytest.approx(0.5 + 2.5 / 128)
    bf16 = shape.params * 2
    assert 0.25 * bf16 < shape.weight_bytes() < 0.40 * bf16


def test_gemma3_head_dim_and_sliding_layers_come_from_the_architecture_defaults() -> None:
    # gemma-3-12b-it's text_config has no head_dim: transformers' Gemma3TextConfig fills in 256,
    # not hidden/heads = 3840/16 = 240; five of every six layers use the 1024-token window.
    shape = shape_of("multimodal")
    assert shape.head_dim == 256
    assert shape.layers == 48 and shape.sliding_layers == 40 and shape.sliding_window == 1024
    assert shape.vocab == 262208 and shape.tied_embeddings
    assert shape.vision_params > 400_000_000


def test_mistral_nemo_head_dim_is_its_own() -> None:
    shape = shape_of("longctx")
    assert shape.head_dim == 128  # not 5120 / 32 = 160
    assert shape.sliding_layers == 0
    # 40 layers x 8 KV heads x 128 x (K and V) x 2 bytes per token.
    assert shape.kv_bytes_per_block() == BLOCK_SIZE * 40 * 8 * 128 * 2 * 2 // 40


def test_sliding_window_layers_hold_only_the_window_plus_the_batches_in_flight() -> None:
    shape = shape_of("multimodal")
    page = BLOCK_SIZE * 8 * 256 * 2 * 2
    full = 8 * math.ceil(8192 / BLOCK_SIZE)
    # vLLM's SlidingWindowSpec: min(window - 1 + 2 batches of 2048 tokens, max_model_len), +1 block.
    sliding = 40 * (math.ceil((1024 - 1 + 2 * 2048) / BLOCK_SIZE) + 1)
    assert shape.kv_bytes_per_request(8192) == (full + sliding + 48) * page
    # Counting every layer as full attention (the old estimate) would be half again as much.
    assert shape.kv_bytes_per_request(8192) < 0.72 * 48 * math.ceil(8192 / BLOCK_SIZE) * page
    # A window longer than the context holds the context (and vLLM's extra misalignment block).
    assert shape.kv_bytes_per_request(1024) == (8 * 64 + 40 * (64 + 1) + 48) * page


def test_kv_rules_match_vllms_own_specs() -> None:
    """Our block counts against vLLM 0.32's FullAttentionSpec and SlidingWindowSpec."""
    torch = pytest.importorskip("torch")
    from vllm.v1.kv_cache_interface import SlidingWindowSpec

    shape = shape_of("multimodal")
    spec = SlidingWindowSpec(
        block_size=BLOCK_SIZE, num_kv_heads=8, head_size=256, dtype=torch.bfloat16, sliding_window=1024
    )
    assert spec.page_size_bytes == shape.kv_bytes_per_block()
    for max_model_len in (512, 4096, 8192, 32768):
        sliding_blocks = spec.max_admission_blocks_per_request(2 * 2048, max_model_len)
        full_blocks = math.ceil(max_model_len / BLOCK_SIZE)
        expected = (8 * full_blocks + 40 * sliding_blocks + 48) * spec.page_size_bytes
        assert shape.kv_bytes_per_request(max_model_len) == expected, max_model_len


def test_tensor_parallelism_splits_weights_and_kv_heads_per_gpu() -> None:
    shape = shape_of("longctx")
    assert shape.weight_bytes(tensor_parallel=2) == pytest.approx(shape.weight_bytes() / 2, rel=1e-6)
    assert shape.kv_bytes_per_request(32768, tensor_parallel=2) == shape.kv_bytes_per_request(32768) // 2
    # More ranks than KV heads: vLLM replicates the heads, one per rank.
    assert shape.kv_bytes_per_block(tensor_parallel=16) == shape.kv_bytes_per_block(tensor_parallel=8)


@pytest.mark.parametrize(
    ("quant", "method", "bits", "group"),
    [
        ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False}, "gptq", 4, 128),
        ({"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True}, "awq", 4, 32),
        (
            {"quant_method": "compressed-tensors",
             "config_groups": {"group_0": {"weights": {"num_bits": 4, "group_size": 64, "symmetric": True}}}},
            "compressed-tensors", 4, 64,
        ),
        ({"quant_method": "fp8"}, "fp8", 8, -1),
        (None, "none", 16, -1),
    ],
)
def test_quantization_configs(quant: dict[str, Any] | None, method: str, bits: int, group: int) -> None:
    config = {"quantization_config": quant} if quant else {}
    parsed = quantization_of(config)
    assert (parsed.method, parsed.bits, parsed.group_size) == (method, bits, group)


def test_a_config_without_dimensions_has_no_shape() -> None:
    assert model_shape({"model_type": "mystery"}) is None


def test_kv_cache_dtype_fp8_halves_the_element() -> None:
    assert kv_dtype_bytes({}) == 2 and kv_dtype_bytes({"kv_cache_dtype": "fp8_e4m3"}) == 1


def test_estimate_is_the_same_before_and_after_the_weights_are_on_disk(tmp_path: Path, monkeypatch) -> None:
    model_id = PRODUCTION_MODELS["longctx"]
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    before = model_metadata(model_id, hub=False)
    assert before.source == "bundled"
    # A Mistral-layout repo with both consolidated and sharded weights (the old estimate counted both).
    add_model(tmp_path, model_id, {
        "consolidated.safetensors": 8 * GIB,
        "model-00001-of-00002.safetensors": 4 * GIB,
        "model-00002-of-00002.safetensors": 4 * GIB,
        "tokenizer_config.json": 10,
        "tekken.json": 10,
    })
    after = model_metadata(model_id, hub=False)
    assert after.source == "cache"
    assert before.config is not None and after.config is not None
    assert model_shape(before.config) == model_shape(after.config)


def make_repo(folder: Path, *names: str) -> str:
    folder.mkdir()
    for name in names:
        (folder / name).write_text(json.dumps({}))
    return str(folder)


def test_a_repo_with_both_layouts_is_served_from_its_hugging_face_files(tmp_path: Path) -> None:
    # mistralai's own repos: vLLM would pick the Mistral tokenizer, which has no chat template.
    both = make_repo(
        tmp_path / "both", "config.json", "consolidated.safetensors", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "tokenizer_config.json", "tekken.json", "params.json",
    )
    args = layout_engine_args(model_metadata(both, hub=False))
    assert args["tokenizer_mode"] == "hf" and args["config_format"] == "hf" and args["load_format"] == "hf"
    assert "consolidated*.safetensors" in args["ignore_patterns"]


def test_a_mistral_only_or_hugging_face_only_repo_keeps_vllms_choice(tmp_path: Path) -> None:
    mistral = make_repo(tmp_path / "mistral", "consolidated.safetensors", "params.json", "tekken.json")
    hugging_face = make_repo(tmp_path / "hf", "config.json", "model.safetensors", "tokenizer_config.json")
    assert layout_engine_args(model_metadata(mistral, hub=False)) == {}
    assert layout_engine_args(model_metadata(hugging_face, hub=False)) == {}


def test_a_mistral_only_repo_is_sized_from_params_json(tmp_path: Path) -> None:
    # Mistral NeMo's params.json in Mistral's own layout: the same dimensions under other names.
    folder = tmp_path / "nemo"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps({
        "dim": 5120, "n_layers": 40, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8,
        "rope_theta": 1000000.0, "norm_eps": 1e-05, "vocab_size": 131072,
    }))
    (folder / "consolidated.safetensors").write_text("")
    meta = model_metadata(str(folder), hub=False)
    assert meta.config is not None
    shape = model_shape(meta.config)
    reference = shape_of("longctx")
    assert shape is not None
    assert shape.params == reference.params
    assert shape.kv_bytes_per_request(32768) == reference.kv_bytes_per_request(32768)
