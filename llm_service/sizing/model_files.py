"""A model's metadata before its weights: config.json and the repository's file names.

Looked up in a local folder, then the Hugging Face cache, then (metadata only, one short attempt,
when the caller asks or, at a service start, unless HF_HUB_OFFLINE) the Hub, then the configs
shipped for the default models. Never downloads weights.
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

# Seconds one request to the Hub may take: a metadata lookup is a convenience, never worth a stall.
HUB_TIMEOUT_SECONDS = 3.0

# config.json of the default models (written from their published architectures), so that a
# first start without network and `plan` on a laptop estimate what a start with the files would.
BUNDLED_CONFIGS = Path(__file__).with_name("model_configs")

# vLLM serves a repo with consolidated*.safetensors in Mistral's own format (tokenizer, config and
# weights), whose tokenizer has no chat template. When the repo also has the Hugging Face layout,
# these engine arguments make vLLM use that instead, so chat works with either layout.
HF_LAYOUT_ARGS: dict[str, Any] = {
    "tokenizer_mode": "hf",
    "config_format": "hf",
    "load_format": "hf",
    "ignore_patterns": ["original/**/*", "consolidated*.safetensors"],
}


@dataclass(frozen=True)
class ModelMetadata:
    """What is known about a model without its weights."""

    model_id: str
    config: dict[str, Any] | None
    source: str  # local, cache, hub, bundled or none
    files: tuple[str, ...] = field(default=())  # repo file names, where known
    # sentence-transformers' max_seq_length (sentence_*_config.json), where the files are on disk:
    # vLLM takes it as the model's longest input, below max_position_embeddings.
    max_seq_length: int | None = None

    def has(self, pattern: str) -> bool:
        return any(fnmatch.fnmatch(name, pattern) for name in self.files)

    @property
    def weights_on_disk(self) -> bool:
        """A local folder, or a cached snapshot with weights: a load need not download them."""
        return self.source == "local" or (self.source == "cache" and self.has("*.safetensors"))


def hub_allowed() -> bool:
    """False when the Hugging Face offline switches are set."""
    return not any(
        os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


# Hugging Face layout first; Mistral's own layout keeps the same dimensions in params.json
# (dim, n_layers, n_heads, n_kv_heads, head_dim, hidden_dim, vocab_size), which estimate.py reads too.
CONFIG_FILES = ("config.json", "params.json")


def _read_config(folder: Path) -> dict[str, Any] | None:
    for name in CONFIG_FILES:
        config = _read_json(folder / name)
        if config is not None:
            return config
    return None


def _sentence_transformers_length(folder: Path) -> int | None:
    """max_seq_length of a sentence-transformers model (sentence_bert_config.json and its kin)."""
    for path in sorted(folder.glob("sentence_*_config.json")):
        value = (_read_json(path) or {}).get("max_seq_length")
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def length_limit(meta: ModelMetadata, positions: int | None) -> int | None:
    """The longest input a model takes, as vLLM derives it: its position embeddings (`positions`),
    or sentence-transformers' max_seq_length where that is set."""
    return meta.max_seq_length if meta.max_seq_length is not None else positions


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _hub_cache_dir() -> str | None:
    """The Hugging Face cache as the environment names it now (huggingface_hub reads it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    return os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None


def _cached(model_id: str, revision: str | None) -> ModelMetadata | None:
    """The model's snapshot in the Hugging Face cache, if config.json is there."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = [
            try_to_load_from_cache(model_id, name, cache_dir=_hub_cache_dir(), revision=revision)
            for name in CONFIG_FILES
        ]
    except Exception:  # an id that is no repo name, a broken cache: nothing cached
        return None
    cached = next((path for path in found if isinstance(path, str)), None)
    if cached is None:
        return None
    snapshot = Path(cached).parent
    names = tuple(sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if not p.is_dir()))
    return ModelMetadata(
        model_id, _read_config(snapshot), "cache", names, max_seq_length=_sentence_transformers_length(snapshot)
    )


def _from_hub(model_id: str, revision: str | None) -> tuple[dict[str, Any] | None, tuple[str, ...]]:
    """config.json (a few kB) and the file list from the Hub; nothing on any error.

    One attempt with a short timeout: the file listing (`list_repo_files`) retries a failed
    connection five times with back-off, about 25 s per model and a printed line per retry, while
    `model_info` asks once and lists the files too.
    """
    try:
        from huggingface_hub import HfApi, hf_hub_download

        info = HfApi().model_info(model_id, revision=revision, timeout=HUB_TIMEOUT_SECONDS)
        files = tuple(sibling.rfilename for sibling in info.siblings or ())
        name = next((n for n in CONFIG_FILES if n in files), CONFIG_FILES[0])
        path = hf_hub_download(
            model_id, name, revision=revision, cache_dir=_hub_cache_dir(), etag_timeout=HUB_TIMEOUT_SECONDS
        )
        config = _read_json(Path(path))
    except Exception as exc:
        log.warning("model_metadata_unavailable", model_id=model_id, error=f"{type(exc).__name__}: {exc}")
        return None, ()
    return config, files


def bundled_config(model_id: str) -> dict[str, Any] | None:
    return _read_json(BUNDLED_CONFIGS / (model_id.replace("/", "--") + ".json"))


def model_metadata(model_id: str, revision: str | None = None, *, hub: bool | None = None) -> ModelMetadata:
    """Metadata of a local folder or a Hub id; `hub` None means: ask the Hub unless offline."""
    folder = Path(model_id).expanduser()
    if folder.is_dir():
        names = tuple(sorted(path.name for path in folder.iterdir()))
        return ModelMetadata(
            model_id, _read_config(folder), "local", names, max_seq_length=_sentence_transformers_length(folder)
        )
    cached = _cached(model_id, revision)
    # A cache with weights is a finished download whose file list is complete: no need to ask.
    complete = cached is not None and cached.has("*.safetensors")
    if not complete and (hub if hub is not None else hub_allowed()):
        config, files = _from_hub(model_id, revision)
        if config is not None:
            return ModelMetadata(model_id, config, "hub", files)
    if cached is not None:
        return cached
    config = bundled_config(model_id)
    return ModelMetadata(model_id, config, "bundled" if config is not None else "none")


def layout_engine_args(meta: ModelMetadata) -> dict[str, Any]:
    """Engine arguments for a repo with both the Mistral and the Hugging Face layout, else none."""
    mistral = meta.has("consolidated*.safetensors")
    hugging_face = meta.has("config.json") and (meta.has("model*.safetensors") or meta.has("tokenizer_config.json"))
    return dict(HF_LAYOUT_ARGS) if mistral and hugging_face else {}
