"""A Hugging Face cache directory on disk for sizing tests: real layout, sparse weight files."""

from __future__ import annotations

import shutil
from pathlib import Path

from llm_service.sizing.model_files import BUNDLED_CONFIGS

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_model(cache: Path, model_id: str, files: dict[str, int], config: Path | None = None) -> Path:
    """Put `model_id` in the cache at `cache` (HF_HUB_CACHE): config.json from the bundled configs
    (or `config`), and each of `files` as a sparse file of that many bytes. Returns the snapshot."""
    repo = cache / ("models--" + model_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    source = config or BUNDLED_CONFIGS / (model_id.replace("/", "--") + ".json")
    shutil.copyfile(source, snapshot / "config.json")
    for name, size in files.items():
        with open(snapshot / name, "wb") as handle:
            handle.truncate(size)  # sparse: the size without the disk
    return snapshot
