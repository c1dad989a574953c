"""The slot set as data: built-in defaults < LLM_CONFIG_FILE < environment, and one-line config errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_service.__main__ import main
from llm_service.config.engine_configs import build_slot_configs
from llm_service.config.settings import LLMSettings, SettingsError, load_settings

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "deploy" / "slots.example.yaml"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("LLM_"):
            monkeypatch.delenv(key)


def config(tmp_path: Path, text: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "slots.yaml"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setenv("LLM_CONFIG_FILE", str(path))
    return path


def test_the_built_in_set_is_todays() -> None:
    llm = LLMSettings()
    assert llm.enabled_slots() == ("standard", "longctx", "multimodal")
    assert llm.preload_models == ["standard", "longctx"]
    with_retrieval = LLMSettings(model_embedding="a/b", model_rerank="c/d")
    assert with_retrieval.enabled_slots() == ("standard", "longctx", "multimodal", "embedding", "rerank")
    assert [with_retrieval.slot(n).kind for n in ("embedding", "rerank")] == ["embedding", "rerank"]


@pytest.mark.parametrize(
    ("variable", "value", "slot", "field", "expected"),
    [
        ("LLM_MODEL_STANDARD", "org/a", "standard", "model", "org/a"),
        ("LLM_MODEL_LONGCTX", "org/b", "longctx", "model", "org/b"),
        ("LLM_MODEL_MULTIMODAL", "org/c", "multimodal", "model", "org/c"),
        ("LLM_MODEL_EMBEDDING", "org/d", "embedding", "model", "org/d"),
        ("LLM_MODEL_RERANK", "org/e", "rerank", "model", "org/e"),
        ("LLM_MAX_MODEL_LEN_STANDARD", "4096", "standard", "max_model_len", 4096),
        ("LLM_MAX_MODEL_LEN_LONGCTX", "16384", "longctx", "max_model_len", 16384),
        ("LLM_MAX_MODEL_LEN_MULTIMODAL", "2048", "multimodal", "max_model_len", 2048),
        ("LLM_MEMORY_SHARE_STANDARD", "0.3", "standard", "memory_share", 0.3),
        ("LLM_MEMORY_SHARE_LONGCTX", "0.2", "longctx", "memory_share", 0.2),
        ("LLM_MEMORY_SHARE_MULTIMODAL", "0.25", "multimodal", "memory_share", 0.25),
        ("LLM_ENGINE_ARGS_STANDARD", '{"max_num_seqs": 8}', "standard", "engine_args", {"max_num_seqs": 8}),
        ("LLM_TOOL_PARSER_LONGCTX", "hermes", "longctx", "tool_parser", "hermes"),
    ],
)
def test_every_documented_per_slot_variable_still_works(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, slot: str, field: str, expected: object
) -> None:
    monkeypatch.setenv(variable, value)
    if slot in ("embedding", "rerank") and field != "model":
        monkeypatch.setenv(f"LLM_MODEL_{slot.upper()}", "org/x")
    assert getattr(load_settings().llm.slot(slot), field) == expected


def test_preload_models_replaces_the_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_PRELOAD_MODELS", "multimodal")
    llm = load_settings().llm
    assert llm.preload_models == ["multimodal"] and not llm.slot("standard").preload


def test_file_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config(tmp_path, """
slots:
  standard:
    max_model_len: 2048
  coder:
    model: org/coder
    memory_share: 0.1
    aliases: [code]
    adapters:
      - {name: sql, path: org/sql-lora}
""", monkeypatch)
    monkeypatch.setenv("LLM_MAX_MODEL_LEN_CODER", "1024")  # flat form works for a slot of the file
    monkeypatch.setenv("LLM_SLOTS__STANDARD__MEMORY_SHARE", "0.2")
    llm = load_settings().llm
    assert llm.enabled_slots() == ("standard", "longctx", "multimodal", "coder")
    assert (llm.slot("standard").max_model_len, llm.slot("standard").memory_share) == (2048, 0.2)
    coder = llm.slot("coder")
    assert (coder.max_model_len, coder.aliases, coder.adapters[0].name) == (1024, ["code"], "sql")


def test_the_nested_form_adds_a_slot_from_the_environment_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_SLOTS__CODER__MODEL", "org/coder")
    monkeypatch.setenv("LLM_SLOTS__CODER__MEMORY_SHARE", "0.1")
    monkeypatch.setenv("LLM_SLOTS__CODER__ADAPTERS", "sql=/adapters/sql,json=org/json")
    monkeypatch.setenv("LLM_SLOTS__QUERIES__MODEL", "org/e5")
    monkeypatch.setenv("LLM_SLOTS__QUERIES__KIND", "embedding")
    llm = load_settings().llm
    assert llm.slot("coder").model == "org/coder" and llm.slot("coder").kind == "generate"
    assert [a.path for a in llm.slot("coder").adapters] == ["/adapters/sql", "org/json"]
    assert llm.slot("queries").kind == "embedding"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("slots:\n  coder:\n    model: a/b\n    modle: x\n", "slot 'coder': field 'modle': unknown field"),
        ("slots:\n  coder:\n    model: a/b\n    kind: chat\n", "slot 'coder': field 'kind': Input should be"),
        ("slots:\n  coder:\n    model: a/b\n  coder:\n    model: c/d\n", "duplicate name(s) ['coder']"),
        ("slots:\n  coder:\n    memory_share: 0.1\n", "slot 'coder': field 'model': missing model"),
        ("slots:\n  Coder-1:\n    model: a/b\n", "slot 'Coder-1': name must match"),
        ("slots:\n  coder:\n    model: a/b\n    aliases: [standard]\n", "duplicate name 'standard'"),
        ("slots:\n  rr:\n    model: a/b\n    kind: rerank\n    adapters: [{name: x, path: y}]\n",
         "slot 'rr': field 'adapters': only generate slots"),
        ("models:\n  coder: {}\n", "the file holds one mapping, `slots:`"),
    ],
)
def test_config_errors_are_one_line_naming_file_slot_and_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    path = config(tmp_path, text, monkeypatch)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    line = str(caught.value)
    assert "\n" not in line and message in line
    assert "duplicate name '" in message or str(path) in line
    assert main([]) == 2  # python -m llm_service: the line on stderr, no traceback
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_the_example_file_builds_six_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_CONFIG_FILE", str(EXAMPLE))
    monkeypatch.chdir(REPO)
    llm = load_settings().llm
    assert llm.enabled_slots() == ("standard", "longctx", "multimodal", "embedding", "rerank", "fast")
    configs = {c.slot: c for c, _ in build_slot_configs(llm, "cpu", 8 * 2**30, hub=False)}
    assert configs["fast"].kind == "generate" and configs["embedding"].kind == "embedding"


def test_the_configmaps_file_is_the_built_in_set_and_its_example_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml

    manifest = yaml.safe_load((REPO / "deploy" / "kubernetes" / "llm-service-slots.yaml").read_text())
    text = manifest["data"]["slots.yaml"]
    config(tmp_path, text, monkeypatch)
    assert load_settings().llm.enabled_slots() == ("standard", "longctx", "multimodal")
    prose = ("LoRA", "A fourth")
    uncommented = "\n".join(
        line.replace("# ", "", 1) for line in text.splitlines() if not line.lstrip("# ").startswith(prose)
    )
    config(tmp_path, uncommented, monkeypatch)
    llm = load_settings().llm
    assert llm.enabled_slots() == ("standard", "longctx", "multimodal", "embedding", "coder")
    assert llm.slot("standard").adapters[0].name == "support-lora"


@pytest.mark.parametrize(
    ("variable", "value", "section", "field", "expected"),
    [
        ("LLM_GPU_MEMORY_UTILIZATION", "0.75", "llm", "gpu_memory_utilization", 0.75),
        ("LLM_LOAD_ON_STARTUP", "false", "llm", "load_on_startup", False),
        ("LLM_TENSOR_PARALLEL_SIZE", "2", "llm", "tensor_parallel_size", 2),
        ("APP_ENV", "development", "app", "env", "development"),
        ("APP_LOG_LEVEL", "debug", "app", "log_level", "DEBUG"),
    ],
)
def test_the_guides_global_variables_still_work(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, section: str, field: str, expected: object
) -> None:
    monkeypatch.setenv(variable, value)
    assert getattr(getattr(load_settings(), section), field) == expected


def test_a_chat_template_per_slot_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages }}")
    monkeypatch.setenv("LLM_CHAT_TEMPLATE_MULTIMODAL", str(template))
    assert load_settings().llm.slot("multimodal").chat_template == template
