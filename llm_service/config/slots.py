"""The slot set as data: one record per named slot, from built-in defaults < LLM_CONFIG_FILE < environment."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

SLOT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
SlotKind = Literal["generate", "embedding", "rerank"]
# The nested environment form: LLM_SLOTS__<NAME>__<FIELD>=value (any slot, any field).
NESTED_PREFIX = "LLM_SLOTS__"
# The flat forms the deployment guide and the docs name: LLM_<FIELD>_<SLOT> for these fields.
FLAT_FIELDS: tuple[str, ...] = (
    "max_model_len", "memory_share", "engine_args", "chat_template", "tool_parser", "model",
)


class SlotConfigError(ValueError):
    """A slot set that cannot be built; the message is one line naming the source, slot and field."""


class AdapterSettings(BaseModel):
    """One LoRA adapter of a generate slot, served under its own model name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Model name clients ask for (unique over every slot and adapter).")
    path: str = Field(description="Local folder or Hugging Face id of a PEFT LoRA adapter.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not ADAPTER_NAME.match(value):
            raise ValueError(f"adapter name {value!r} must match {ADAPTER_NAME.pattern}")
        return value


class SlotSettings(BaseModel):
    """One named slot: what it serves and how its engine starts. Unset fields take the slot's defaults."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, description="Model id or local path; built-in slots default to the production build (GPU) or demo (CPU)."
    )
    kind: SlotKind = Field("generate", description="generate (chat, completions), embedding or rerank.")
    memory_share: float | None = Field(None, gt=0, le=1, description="Budget share; unset: sized from the model.")
    max_model_len: int | None = Field(None, gt=0, description="Context length (tokens); unset: the slot default.")
    engine_args: dict[str, Any] = Field(default_factory=dict, description="Extra vLLM engine arguments.")
    chat_template: Path | None = Field(None, description="Jinja chat template file; unset: the model's own.")
    tool_parser: str | None = Field(
        None, description="vLLM tool-call parser; unset: the one for the model; none: no tools."
    )
    preload: bool = Field(False, description="Load at start and never unload when idle.")
    aliases: list[str] = Field(default_factory=list, description="Other model names that select this slot.")
    adapters: list[AdapterSettings] = Field(default_factory=list, description="LoRA adapters (generate slots).")
    max_loras: int = Field(1, ge=1, le=64, description="Adapters one batch may use at once (vLLM's max_loras).")
    max_lora_rank: int = Field(16, ge=1, le=512, description="Largest adapter rank (vLLM's max_lora_rank).")

    @field_validator("engine_args", mode="before")
    @classmethod
    def _json_object(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except ValueError as exc:
                raise ValueError(f"not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError("must be a JSON object")
        return value

    @field_validator("aliases", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value

    @field_validator("adapters", mode="before")
    @classmethod
    def _adapter_list(cls, value: Any) -> Any:
        """name=path,name=path (as `vllm serve --lora-modules`) or a list of {name, path}."""
        if isinstance(value, str):
            pairs = [part.strip().split("=", 1) for part in value.split(",") if part.strip()]
            if any(len(pair) != 2 for pair in pairs):
                raise ValueError("give adapters as name=path,name=path")
            return [{"name": name.strip(), "path": path.strip()} for name, path in pairs]
        return value

    @field_validator("chat_template")
    @classmethod
    def _template_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @field_validator("tool_parser")
    @classmethod
    def _parser_name(cls, value: str | None) -> str | None:
        if value is not None and not value.replace("_", "").isalnum():
            raise ValueError(f"not a tool parser name: {value!r} (e.g. llama3_json, mistral, hermes, none)")
        return value


@dataclass(frozen=True)
class BuiltinSlot:
    """A slot the service has without any configuration, and its defaults."""

    name: str
    kind: SlotKind
    max_model_len: int
    demo_model: Path  # the CPU default, relative to the working directory
    production_model: str | None = None  # the GPU default; None: the slot is off until its model is set
    preload: bool = False
    guide_model: str | None = None  # the deployment guide's (unpublished) id: an alias of production_model


# Where `python -m llm_service.tools.demo_model` writes the demo checkpoints (relative to the cwd): the text
# model, an Idefics3 around it (random vision tower) and sentence-transformers' all-MiniLM-L6-v2.
DEMO_MODEL_DIR = Path("models/SmolLM2-135M-Instruct")
DEMO_MULTIMODAL_DIR = Path("models/SmolLM2-135M-Idefics3")
DEMO_EMBEDDING_DIR = Path("models/all-MiniLM-L6-v2")
# A random-weight LoRA adapter for the demo model (`python -m llm_service.tools.demo_adapter`).
DEMO_ADAPTER_DIR = Path("models/SmolLM2-135M-LoRA-demo")
# The built-in slots (the deployment guide's three, then the optional retrieval slots): the one place
# their defaults live. Demo checkpoints are built by `python -m llm_service.tools.demo_model` (make setup).
BUILTIN_SLOTS: tuple[BuiltinSlot, ...] = (
    BuiltinSlot("standard", "generate", 8192, DEMO_MODEL_DIR,
                "hugging-quants/Meta-Llama-3.1-8B-Instruct-AWQ-INT4", preload=True,
                guide_model="meta-llama/Llama-3.1-8B-Instruct-AWQ"),
    BuiltinSlot("longctx", "generate", 32768, DEMO_MODEL_DIR,
                "casperhansen/mistral-nemo-instruct-2407-awq", preload=True,
                guide_model="mistralai/Mistral-NeMo-Instruct-2407-AWQ"),
    BuiltinSlot("multimodal", "generate", 8192, DEMO_MULTIMODAL_DIR,
                "gaunernst/gemma-3-12b-it-int4-awq", guide_model="google/gemma-3-12b-it-awq"),
    BuiltinSlot("embedding", "embedding", 2048, DEMO_EMBEDDING_DIR),
    BuiltinSlot("rerank", "rerank", 2048, DEMO_EMBEDDING_DIR),
)
BUILTIN: dict[str, BuiltinSlot] = {slot.name: slot for slot in BUILTIN_SLOTS}


def builtin_env_vars() -> set[str]:
    """The flat per-slot variables of the built-in slots (LLM_MODEL_STANDARD, ...)."""
    return {f"LLM_{field}_{name}".upper() for name in BUILTIN for field in FLAT_FIELDS}


def _field_error(source: str, slot: str, exc: ValidationError) -> SlotConfigError:
    error = exc.errors()[0]
    field = ".".join(str(part) for part in error["loc"]) or "?"
    message = "unknown field" if error["type"] == "extra_forbidden" else error["msg"]
    return SlotConfigError(f"{source}: slot {slot!r}: field {field!r}: {message}")


def read_config_file(path: Path) -> dict[str, dict[str, Any]]:
    """The `slots:` mapping of a YAML config file (slot name -> fields)."""
    import yaml

    source = f"LLM_CONFIG_FILE {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SlotConfigError(f"{source}: cannot read: {exc.strerror}") from None

    class _UniqueKeys(yaml.SafeLoader):
        """Refuses a key given twice in one mapping (a slot named twice)."""

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
        keys = [loader.construct_object(key) for key, _ in node.value]
        twice = sorted({str(key) for key in keys if keys.count(key) > 1})
        if twice:
            raise SlotConfigError(f"{source}: duplicate name(s) {twice} (line {node.start_mark.line + 1})")
        return loader.construct_mapping(node)

    _UniqueKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        data = yaml.load(text, Loader=_UniqueKeys) or {}
    except yaml.YAMLError as exc:
        raise SlotConfigError(f"{source}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or set(data) - {"slots"}:
        raise SlotConfigError(f"{source}: the file holds one mapping, `slots:` (slot name -> fields)")
    slots = data.get("slots") or {}
    if not isinstance(slots, dict) or not all(isinstance(v, dict | None) for v in slots.values()):
        raise SlotConfigError(f"{source}: `slots:` maps each slot name to a mapping of its fields")
    return {str(name): dict(fields or {}) for name, fields in slots.items()}


def env_overrides(environ: Mapping[str, str], known: set[str]) -> dict[str, dict[str, Any]]:
    """Per-slot fields from the environment: LLM_<FIELD>_<SLOT> for known slots, LLM_SLOTS__<SLOT>__<FIELD> for any."""
    found: dict[str, dict[str, Any]] = {}
    for key, value in environ.items():
        upper = key.upper()
        if upper.startswith(NESTED_PREFIX):
            slot, _, field = upper[len(NESTED_PREFIX):].partition("__")
            if not field:
                raise SlotConfigError(f"{key}: give {NESTED_PREFIX}<SLOT>__<FIELD>")
            found.setdefault(slot.lower(), {})[field.lower()] = value
            continue
        for field in FLAT_FIELDS:
            prefix = f"LLM_{field.upper()}_"
            slot = upper[len(prefix):].lower() if upper.startswith(prefix) else ""
            if slot in known:
                found.setdefault(slot, {})[field] = value
                break
    return found


def build_slot_set(
    config_file: Path | None,
    environ: Mapping[str, str],
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    preload: list[str] | None = None,
) -> dict[str, SlotSettings]:
    """Every configured slot, later sources winning field by field: built-ins, the file, the environment,
    then `overrides` (keyword arguments); `preload` (LLM_PRELOAD_MODELS) replaces every preload flag.

    Built-in retrieval slots without a model are left out. Raises SlotConfigError.
    """
    raw: dict[str, dict[str, Any]] = {
        name: {"kind": slot.kind, "preload": slot.preload} for name, slot in BUILTIN.items()
    }
    sources: dict[str, str] = dict.fromkeys(raw, "built-in defaults")
    layers: list[tuple[str, dict[str, dict[str, Any]]]] = []
    if config_file is not None:
        layers.append((f"LLM_CONFIG_FILE {config_file}", read_config_file(config_file)))
    file_names = set(layers[0][1]) if layers else set()
    layers.append(("environment", env_overrides(environ, set(raw) | file_names)))
    layers.append(("settings", {k: dict(v) for k, v in (overrides or {}).items()}))
    for source, layer in layers:
        for name, fields in layer.items():
            if not SLOT_NAME.match(name):
                raise SlotConfigError(f"{source}: slot {name!r}: name must match {SLOT_NAME.pattern}")
            if name not in raw:
                raw[name] = {}
            raw[name].update(fields)
            sources[name] = source
    slots: dict[str, SlotSettings] = {}
    for name, fields in raw.items():
        try:
            slot = SlotSettings(**fields)
        except ValidationError as exc:
            raise _field_error(sources[name], name, exc) from None
        builtin = BUILTIN.get(name)
        if slot.model is None and builtin is None:
            raise SlotConfigError(f"{sources[name]}: slot {name!r}: field 'model': missing model")
        if builtin is not None and builtin.production_model is None and not slot.model:
            continue  # an optional retrieval slot that is off
        if slot.adapters and slot.kind != "generate":
            raise SlotConfigError(
                f"{sources[name]}: slot {name!r}: field 'adapters': only generate slots take adapters"
            )
        slots[name] = slot
    if preload is not None:
        unknown = [name for name in preload if name not in slots and name not in BUILTIN]
        if unknown:
            raise SlotConfigError(f"LLM_PRELOAD_MODELS: unknown slot(s) {unknown}; slots are {list(slots)}")
        for name, slot in slots.items():
            slot.preload = name in preload
    _check_unique_names(slots)
    return slots


def _check_unique_names(slots: Mapping[str, SlotSettings]) -> None:
    """A model name (slot, alias, adapter) selects one thing only."""
    seen: dict[str, str] = {}
    for name, slot in slots.items():
        names = [name, *(a for a in slot.aliases if a != name), *(adapter.name for adapter in slot.adapters)]
        for model_name in names:
            if model_name in seen:
                raise SlotConfigError(
                    f"slot {name!r}: duplicate name {model_name!r} (also slot {seen[model_name]!r})"
                )
            seen[model_name] = name


def main() -> int:
    """python -m llm_service.config.slots: each configured slot and the model a GPU deployment fetches
    for it, one `slot<TAB>model` line each (scripts/model-download.sh reads them); errors as one line."""
    import os
    import sys

    file = os.environ.get("LLM_CONFIG_FILE")
    preload = None  # preload does not change what is downloaded
    try:
        slots = build_slot_set(Path(file) if file else None, os.environ, preload=preload)
    except SlotConfigError as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    for name, slot in slots.items():
        builtin = BUILTIN.get(name)
        model = slot.model or (builtin.production_model if builtin else None)
        sys.stdout.write(f"{name}\t{model}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
