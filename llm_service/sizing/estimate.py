"""Memory an engine needs, from the model's config.json alone, by the rules vLLM 0.32 applies.

Nothing here looks at weight files or model names: the same config gives the same estimate
before and after the weights are downloaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

GIB = 1024**3

# vLLM's defaults for an AsyncLLM built from engine args (UsageContext.ENGINE_CONTEXT):
# SchedulerConfig.DEFAULT_MAX_NUM_BATCHED_TOKENS / DEFAULT_MAX_NUM_SEQS, CacheConfig.DEFAULT_BLOCK_SIZE.
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
DEFAULT_MAX_NUM_SEQS = 128
BLOCK_SIZE = 16
# With async scheduling (the CUDA default) two batches are in flight at once
# (VllmConfig.max_concurrent_batches), and sliding-window layers keep blocks for both.
CONCURRENT_BATCHES = 2

_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}

# What transformers' config classes fill in when a config.json leaves a key out (vLLM reads the
# config through them): gemma-3-12b-it's text_config has no head_dim, vocab_size or layer pattern.
_ARCHITECTURE_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma3_text": {
        "head_dim": 256,
        "vocab_size": 262208,
        "sliding_window": 4096,
        "sliding_window_pattern": 6,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": True,
    },
    "gemma2": {"head_dim": 256, "vocab_size": 256000, "sliding_window": 4096, "sliding_window_pattern": 2,
               "tie_word_embeddings": True},
    "gemma": {"head_dim": 256, "vocab_size": 256000, "tie_word_embeddings": True},
    "llama": {"tie_word_embeddings": False},
    "mistral": {"tie_word_embeddings": False, "sliding_window": None},
    "qwen2": {"tie_word_embeddings": False, "use_sliding_window": False},
}


@dataclass(frozen=True)
class Quantization:
    """How the decoder's linear layers are stored: bits per weight, group size, zero points."""

    method: str
    bits: int
    group_size: int  # -1: one scale per output channel
    zero_points: bool

    def bytes_per_param(self) -> float:
        if self.bits >= 16:
            return 2.0
        group = self.group_size if self.group_size > 0 else 4096
        # Packed weights, then per group an fp16 scale and (AWQ, GPTQ) a packed zero point.
        per_group = 2.0 + (self.bits / 8 if self.zero_points else 0.0)
        return self.bits / 8 + per_group / group


NO_QUANTIZATION = Quantization("none", 16, -1, False)


def quantization_of(config: dict[str, Any]) -> Quantization:
    """The quantization_config of a checkpoint, as vLLM reads it (AWQ, GPTQ, compressed-tensors, fp8)."""
    quant = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    if not isinstance(quant, dict):
        return NO_QUANTIZATION
    method = str(quant.get("quant_method", "")).lower()
    if method in ("awq", "gptq", "awq_marlin", "gptq_marlin"):
        return Quantization(
            method,
            int(quant.get("bits") or quant.get("w_bit") or 4),
            int(quant.get("group_size") or quant.get("q_group_size") or 128),
            True,
        )
    if method == "compressed-tensors":
        for group in (quant.get("config_groups") or {}).values():
            weights = group.get("weights") or {}
            if weights.get("num_bits"):
                return Quantization(
                    method,
                    int(weights["num_bits"]),
                    int(weights.get("group_size") or -1),
                    not weights.get("symmetric", True),
                )
    if method in ("fp8", "fbgemm_fp8", "modelopt"):
        return Quantization(method, 8, -1, False)
    if method == "bitsandbytes":
        return Quantization(method, 4 if quant.get("load_in_4bit") else 8, 64, False)
    return NO_QUANTIZATION


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder (and optional vision tower) that memory depends on."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    experts: int  # 1 for a dense model
    sliding_window: int | None
    sliding_layers: int  # how many layers attend only to the last `sliding_window` tokens
    vision_params: int  # vision tower and projector; 0 for a text model
    quantization: Quantization
    max_position_embeddings: int | None

    def lora_bytes(self, max_loras: int, max_rank: int, dtype_bytes: int = 2) -> int:
        """vLLM's LoRA buffers: A (rank x in) and B (out x rank) per adapter slot for every linear layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        in_plus_out = (self.hidden + q) * 2 + (self.hidden + kv) * 2 + (self.hidden + self.intermediate) * 3
        return self.layers * in_plus_out * max_rank * max_loras * dtype_bytes

    @property
    def linear_params(self) -> int:
        """Parameters of the decoder's linear layers (the ones quantization applies to)."""
        attention = self.hidden * self.heads * self.head_dim * 2 + self.hidden * self.kv_heads * self.head_dim * 2
        mlp = 3 * self.hidden * self.intermediate * self.experts
        return self.layers * (attention + mlp)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def params(self) -> int:
        return self.linear_params + self.embedding_params + self.vision_params

    def weight_bytes(self, tensor_parallel: int = 1, vision: bool = True) -> int:
        """Bytes of weights on each GPU: quantized linear layers, bf16 embeddings and vision tower."""
        total = self.linear_params * self.quantization.bytes_per_param() + self.embedding_params * 2
        if vision:
            total += self.vision_params * 2
        return math.ceil(total / tensor_parallel)

    def kv_bytes_per_block(self, tensor_parallel: int = 1, dtype_bytes: int = 2, block_size: int = BLOCK_SIZE) -> int:
        """One KV page of one layer on one GPU (vLLM's AttentionSpec.page_size_bytes)."""
        # vLLM shards KV heads over TP ranks and replicates them when there are fewer heads than ranks.
        heads = max(1, self.kv_heads // tensor_parallel)
        return block_size * heads * self.head_dim * 2 * dtype_bytes

    def kv_bytes_per_request(
        self,
        max_model_len: int,
        tensor_parallel: int = 1,
        dtype_bytes: int = 2,
        max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
        block_size: int = BLOCK_SIZE,
    ) -> int:
        """KV cache one request of `max_model_len` tokens holds on one GPU.

        As vLLM's FullAttentionSpec and SlidingWindowSpec.max_memory_usage_bytes: a full-attention
        layer keeps every token; a sliding-window layer (hybrid KV cache manager) keeps the window
        plus the tokens of the batches in flight, plus one block for the window's misalignment.
        vLLM refuses to start an engine whose KV cache cannot hold one such request.
        """
        full_blocks = math.ceil(max_model_len / block_size)
        blocks = (self.layers - self.sliding_layers) * full_blocks
        if self.sliding_layers and self.sliding_window:
            in_flight = CONCURRENT_BATCHES * max_num_batched_tokens
            window_tokens = min(self.sliding_window - 1 + in_flight, max_model_len)
            blocks += self.sliding_layers * (math.ceil(window_tokens / block_size) + 1)
        # +1 block per layer: the null block vLLM's block pool holds back for good.
        return (blocks + self.layers) * self.kv_bytes_per_block(tensor_parallel, dtype_bytes, block_size)

    def activation_bytes(
        self,
        tensor_parallel: int = 1,
        max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
        max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
    ) -> int:
        """Peak of vLLM's profiling forward pass: the widest MLP activations of a full batch of
        tokens and the fp32 logits (with the sampler's copies) of a full batch of sequences."""
        per_token = (2 * self.intermediate + 4 * self.hidden) * 2 // tensor_parallel
        logits = max_num_seqs * self.vocab * 4 * 3
        return max_num_batched_tokens * per_token + logits


def _int(section: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = section.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _sliding_layers(text: dict[str, Any], layers: int) -> tuple[int | None, int]:
    """The sliding window and how many layers use it (layer_types, else gemma's pattern)."""
    window = _int(text, "sliding_window")
    if window is None:
        return None, 0
    layer_types = text.get("layer_types")
    if isinstance(layer_types, list) and layer_types:
        return window, sum(1 for kind in layer_types if kind == "sliding_attention")
    pattern = _int(text, "sliding_window_pattern")
    if pattern:
        # Gemma 3: every pattern-th layer is global, the others slide.
        return window, layers - layers // pattern
    if text.get("use_sliding_window") is False:
        return None, 0
    # A window without a layer pattern (Mistral 7B v0.1) applies to every layer.
    return window, layers


def _vision_params(vision: dict[str, Any] | None, text_hidden: int) -> int:
    if not isinstance(vision, dict):
        return 0
    hidden = _int(vision, "hidden_size")
    layers = _int(vision, "num_hidden_layers")
    if hidden is None or layers is None:
        return 0
    intermediate = _int(vision, "intermediate_size") or 4 * hidden
    patch = _int(vision, "patch_size") or 14
    image = _int(vision, "image_size") or 224
    per_layer = 4 * hidden * hidden + 2 * hidden * intermediate
    patches = (image // patch) ** 2
    return layers * per_layer + patches * hidden + 3 * patch * patch * hidden + hidden * text_hidden


def model_shape(config: dict[str, Any]) -> ModelShape | None:
    """The shape of a Hugging Face config.json (top level or its text_config); None if it lacks one."""
    nested = config.get("text_config")
    text: dict[str, Any] = nested if isinstance(nested, dict) else config
    text_type = text.get("model_type") or ("gemma3_text" if config.get("model_type") == "gemma3" else None)
    text = {**_ARCHITECTURE_DEFAULTS.get(str(text_type), {}), **text}
    layers = _int(text, "num_hidden_layers", "n_layers")
    hidden = _int(text, "hidden_size", "dim")
    heads = _int(text, "num_attention_heads", "n_heads")
    intermediate = _int(text, "intermediate_size", "hidden_dim")
    vocab = _int(text, "vocab_size") or _int(config, "vocab_size")
    if layers is None or hidden is None or heads is None or intermediate is None or vocab is None:
        return None
    window, sliding = _sliding_layers(text, layers)
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    experts = _int(text, "num_local_experts", "num_experts") or 1
    if experts > 1:
        intermediate = _int(text, "moe_intermediate_size") or intermediate
    return ModelShape(
        layers=layers,
        hidden=hidden,
        intermediate=intermediate,
        heads=heads,
        kv_heads=_int(text, "num_key_value_heads", "n_kv_heads") or heads,
        # Not hidden/heads: Gemma 3 (256 vs 240) and Mistral NeMo (128 vs 160) set their own.
        head_dim=_int(text, "head_dim") or hidden // heads,
        vocab=vocab,
        tied_embeddings=bool(tied),
        experts=experts,
        sliding_window=window,
        sliding_layers=sliding,
        vision_params=_vision_params(config.get("vision_config"), hidden),
        quantization=quantization_of(config),
        max_position_embeddings=_int(text, "max_position_embeddings"),
    )


def kv_dtype_bytes(engine_args: dict[str, Any]) -> int:
    """Bytes per KV element: the model dtype (bf16/fp16) unless kv_cache_dtype asks for fp8."""
    kv_dtype = str(engine_args.get("kv_cache_dtype", "auto")).lower()
    if kv_dtype.startswith("fp8") or kv_dtype.startswith("int8"):
        return 1
    return _DTYPE_BYTES.get(str(engine_args.get("dtype", "auto")).lower(), 2)
