"""Typed settings tree read from the environment (names as in the deployment guide)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from llm_service.config.slots import (
    BUILTIN_SLOTS,
    FLAT_FIELDS,
    SlotConfigError,
    build_slot_set,
    builtin_env_vars,
)
from llm_service.config.slots import (
    DEMO_EMBEDDING_DIR as DEMO_EMBEDDING_DIR,
)
from llm_service.config.slots import (
    DEMO_MODEL_DIR as DEMO_MODEL_DIR,
)
from llm_service.config.slots import (
    DEMO_MULTIMODAL_DIR as DEMO_MULTIMODAL_DIR,
)
from llm_service.config.slots import (
    SlotSettings as SlotSettings,
)

# The built-in generation slots (the deployment guide's three); every slot's defaults: slot_settings.BUILTIN_SLOTS.
SLOTS: tuple[str, ...] = tuple(slot.name for slot in BUILTIN_SLOTS if slot.production_model)
PRODUCTION_MODELS: dict[str, str] = {
    slot.name: slot.production_model for slot in BUILTIN_SLOTS if slot.production_model
}
# The deployment guide names ids that are not published on the Hub; they still work, as aliases
# of the builds above (resolved with a log line).
GUIDE_MODEL_ALIASES: dict[str, str] = {
    slot.guide_model: slot.production_model for slot in BUILTIN_SLOTS if slot.guide_model and slot.production_model
}


class SettingsError(ValueError):
    """A setting has a wrong value; the message names the environment variable."""


def read_secret_file(path: Path, name: str) -> SecretStr:
    """The secret held in a mounted file (surrounding whitespace dropped); ValueError if unreadable or empty."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"{name}: cannot read {path}: {exc.strerror}") from None
    if not text:
        raise ValueError(f"{name}: {path} is empty")
    return SecretStr(text)


def secret_from_file(current: object, path: Path | None, env: str) -> SecretStr | None:
    """The secret of `env`'s `_FILE` variant when it is set (and `env` itself is not), else None."""
    if path is None:
        return None
    if current is not None:
        raise ValueError(f"set {env} or {env}_FILE, not both")
    return read_secret_file(path, f"{env}_FILE")


class AppSettings(BaseSettings):
    """Process-level settings (APP_*)."""

    model_config = SettingsConfigDict(env_prefix="APP_", extra="ignore")

    env: Literal["development", "production", "test"] = Field(
        "production", description="development switches logs to console format."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="Minimum level of log lines."
    )
    host: str = Field("0.0.0.0", description="Address uvicorn binds to.")
    port: int = Field(8002, ge=1, le=65535, description="Port uvicorn listens on.")
    admin_token: SecretStr | None = Field(
        None, description="Bearer token of the /admin API (load and unload slots); unset disables it."
    )
    admin_token_file: Path | None = Field(
        None, description="File holding the admin token (a mounted secret); instead of APP_ADMIN_TOKEN."
    )
    max_body_bytes: int = Field(
        2 * 1024 * 1024,
        ge=1024,
        le=1024**3,
        description="Largest request body accepted; a larger one gets 413 before it is read or parsed.",
    )
    keep_alive_seconds: int = Field(
        75,
        ge=1,
        le=3600,
        description="How long an idle HTTP connection stays open for the client's next request. Above the "
        "idle timeouts of what connects to the service (httpx and the openai SDK 5 s, nginx and cloud load "
        "balancers 60 s), so the service never closes a connection as a client sends on it.",
    )
    shutdown_grace_seconds: int = Field(
        30,
        gt=0,
        le=3600,
        description="How long requests in flight may take to finish after SIGTERM (new ones get 503 "
        "meanwhile) before the engines stop; keep it below the Kubernetes terminationGracePeriodSeconds "
        "minus the preStop pause and the engines' stop time (~15 s).",
    )

    @model_validator(mode="after")
    def _secret_files(self) -> AppSettings:
        token = secret_from_file(self.admin_token, self.admin_token_file, "APP_ADMIN_TOKEN")
        if token is not None:
            self.admin_token = token
        return self

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class LLMSettings(BaseSettings):
    """Models, memory budget and registry behaviour (LLM_*)."""

    model_config = SettingsConfigDict(env_prefix="LLM_", extra="ignore")

    config_file: Path | None = Field(
        None,
        description="YAML file of the slot set (`slots:` name -> fields); the environment overrides it field by field.",
    )
    slots: dict[str, SlotSettings] = Field(
        default_factory=dict,
        description="The slot set: built-in defaults < LLM_CONFIG_FILE < LLM_<FIELD>_<SLOT> and "
        "LLM_SLOTS__<SLOT>__<FIELD> variables.",
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="auto: what the installed vLLM runs on (cuda for its CUDA build, else cpu)."
    )
    gpu_memory_utilization: float = Field(
        0.85,
        gt=0.0,
        le=1.0,
        description="Total fraction of device memory all loaded engines may use together "
        "(on the CPU backend: of NUMA node 0's memory).",
    )
    load_on_startup: bool = Field(True, description="Load the preload slots before serving.")
    preload_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma list of slots loaded at start and never unloaded when idle (replaces every slot's "
        "`preload`; unset: the slots marked preload, by default standard and longctx).",
    )
    embedding_max_inputs: int = Field(
        2048, ge=1, description="Most inputs one /v1/embeddings request may carry (400 past it)."
    )
    rerank_max_documents: int = Field(
        1000, ge=1, description="Most documents one /v1/rerank request may carry (400 past it)."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs each engine is split across.")
    min_model_len: int = Field(
        4096,
        ge=256,
        description="Shortest context a slot's default max_model_len is cut to when the slot does not fit "
        "the device; a slot that does not fit even then is reported as not loadable.",
    )
    multimodal_images: bool = Field(
        True,
        description="Accept images on slots whose model takes them; false starts their engines text-only "
        "(no vision tower loaded or profiled).",
    )
    enforce_eager: bool | None = Field(
        None, description="Skip CUDA graphs / torch.compile; default true on cpu, false on cuda."
    )
    idle_unload_seconds: float = Field(
        1800.0, ge=0, description="Unload a non-preloaded slot idle this long (0 = never)."
    )
    load_wait_seconds: float = Field(
        120.0, gt=0, description="How long a request waits for its slot to load before 503."
    )
    eviction_wait_seconds: float = Field(
        10.0, ge=0, description="How long a load waits for in-flight requests of an LRU slot to end."
    )
    load_retry_seconds: float = Field(
        10.0,
        ge=0,
        description="Back-off before a failed slot (a failed load or a dead engine) is loaded again by itself; "
        "it doubles with each failure in a row, up to LLM_LOAD_RETRY_MAX_SECONDS.",
    )
    load_retry_max_seconds: float = Field(
        300.0, ge=0, description="Longest back-off between automatic loads of a slot that keeps failing."
    )
    min_residency_seconds: float = Field(
        5.0, ge=0, description="A loaded slot is not evicted sooner than this after its load (stops thrashing)."
    )
    swap_fairness_seconds: float = Field(
        30.0,
        ge=0,
        description="While a slot's requests wait for room in the budget, a loaded slot in the way keeps "
        "admitting requests this long before it drains and is evicted.",
    )
    memory_wait_seconds: float = Field(
        30.0,
        ge=0,
        description="How long a load waits for the device memory of an evicted or dead engine to be free.",
    )
    default_max_tokens: int = Field(256, gt=0, description="max_tokens when a request gives none.")
    cache_enabled: bool = Field(
        True,
        description="Answer reproducible requests from the Redis response cache and coalesce identical ones.",
    )
    cache_ttl_seconds: int = Field(
        3600,
        ge=1,
        description="Default lifetime of a cached response (a request's max-age or cache.ttl overrides it).",
    )
    cache_max_entry_bytes: int = Field(
        1_048_576, ge=1024, description="Responses whose cache entry is larger than this are not stored."
    )
    cache_local_max_entries: int = Field(
        4096,
        ge=0,
        description="Entries each replica keeps in its in-process tier in front of Redis (0 = no local tier).",
    )
    cache_local_max_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Encoded bytes each replica's in-process cache tier holds at most."
    )
    cache_local_max_age_seconds: int = Field(
        300,
        ge=1,
        description="Longest an entry stays in the in-process tier (less when its own TTL ends sooner).",
    )
    cache_namespace: str = Field(
        "llm-service", pattern=r"^[A-Za-z0-9_.:-]{1,64}$", description="Prefix of every cache key in Redis."
    )
    max_pending_per_slot: int = Field(
        0,
        ge=0,
        description="Most requests (sequences) running in a slot's engine plus waiting for it; more get 429 "
        "(0 = no count bound: admission by work, what the engine holds and drains before the deadline).",
    )
    max_pending_total: int = Field(
        0, ge=0, description="Most requests running or waiting over all slots; more get 429 (0 = no count bound)."
    )
    pending_per_batch: float = Field(
        2.0,
        ge=1.0,
        le=100.0,
        description="Until a slot's drain rate is measured (its first finished request), the work it holds "
        "(running plus queued) may reach this many times what its engine runs at once (KV cache tokens "
        "and max_num_seqs); past it 429.",
    )
    max_pending_before_load: int = Field(
        64, ge=1, description="Per-slot bound while the slot's engine has not loaded yet (its capacity unknown)."
    )
    request_timeout_seconds: float = Field(
        600.0,
        gt=0,
        description="Deadline of a request without its own (waiting for a load included); past it the "
        "engine request is aborted and the client gets 504.",
    )
    max_request_timeout_seconds: float = Field(
        3600.0,
        gt=0,
        description="Largest timeout a request may ask for (X-Request-Timeout header or `timeout` field).",
    )
    api_keys: SecretStr | None = Field(
        None,
        description="Comma-separated API keys; when set (or LLM_API_KEYS_FILE), generation, /v1 and /admin "
        "routes need one as `Authorization: Bearer <key>` or `x-api-key: <key>`.",
    )
    api_keys_file: Path | None = Field(
        None, description="File of API keys, one a line (a mounted secret); adds to LLM_API_KEYS."
    )

    @model_validator(mode="after")
    def _timeouts_and_keys(self) -> LLMSettings:
        if self.request_timeout_seconds > self.max_request_timeout_seconds:
            raise ValueError(
                "LLM_REQUEST_TIMEOUT_SECONDS must not exceed LLM_MAX_REQUEST_TIMEOUT_SECONDS "
                f"({self.request_timeout_seconds} > {self.max_request_timeout_seconds})"
            )
        self.api_key_set()  # an unreadable or empty key file fails at start
        return self

    def api_key_set(self) -> frozenset[str]:
        """Every accepted API key (empty: no key needed)."""
        keys: list[str] = []
        if self.api_keys is not None:
            keys += self.api_keys.get_secret_value().split(",")
        if self.api_keys_file is not None:
            keys += read_secret_file(self.api_keys_file, "LLM_API_KEYS_FILE").get_secret_value().splitlines()
        return frozenset(key.strip() for key in keys if key.strip())

    @field_validator("load_retry_max_seconds")
    @classmethod
    def _retry_max_not_below_first(cls, value: float, info: ValidationInfo) -> float:
        first = info.data.get("load_retry_seconds")
        if first is not None and value < first:
            raise ValueError(f"must be at least LLM_LOAD_RETRY_SECONDS ({first})")
        return value

    @model_validator(mode="before")
    @classmethod
    def _slot_set(cls, data: Any) -> Any:
        """Build `slots` from the defaults, the file, the environment and flat keyword arguments."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        overrides: dict[str, dict[str, Any]] = {
            name: dict(fields) for name, fields in (data.pop("slots", None) or {}).items()
        }
        for key in [k for k in data if k not in cls.model_fields]:
            field = next((f for f in FLAT_FIELDS if key.startswith(f"{f}_")), None)
            if field is not None:
                overrides.setdefault(key[len(field) + 1:], {})[field] = data.pop(key)
        preload = data.get("preload_models")
        if isinstance(preload, str):
            preload = [part.strip() for part in preload.split(",") if part.strip()]
        config_file = data.get("config_file")
        slots = build_slot_set(
            Path(config_file) if config_file else None,
            os.environ,
            overrides,
            list(dict.fromkeys(preload)) if preload is not None else None,
        )
        data["slots"] = slots
        data["preload_models"] = [name for name, slot in slots.items() if slot.preload]
        return data

    def enabled_slots(self) -> tuple[str, ...]:
        """Every configured slot's name, built-in ones first."""
        return tuple(self.slots)

    def slot(self, name: str) -> SlotSettings:
        return self.slots[name]


class RedisSettings(BaseSettings):
    """Response cache backend (REDIS_*)."""

    model_config = SettingsConfigDict(env_prefix="REDIS_", extra="ignore")

    host: str = Field("localhost", description="Redis host.")
    port: int = Field(6379, ge=1, le=65535, description="Redis port.")
    db: int = Field(0, ge=0, description="Redis database number.")
    password: SecretStr | None = Field(None, description="Redis password (AUTH).")
    password_file: Path | None = Field(
        None, description="File holding the Redis password (a mounted secret); instead of REDIS_PASSWORD."
    )
    tls: bool = Field(False, description="Connect to Redis over TLS.")
    tls_ca_file: Path | None = Field(None, description="CA bundle that verifies Redis's TLS certificate.")
    socket_timeout_seconds: float = Field(
        0.25, gt=0, le=10, description="Longest wait for one Redis reply; a slower Redis counts as a miss."
    )
    connect_timeout_seconds: float = Field(
        0.5, gt=0, le=10, description="Longest wait for a Redis connection."
    )
    max_connections: int = Field(
        32,
        ge=2,
        le=10_000,
        description="Most connections this replica opens to Redis (the purge subscription's included); "
        "past it a request waits for a free one within REDIS_SOCKET_TIMEOUT_SECONDS, else it is a miss.",
    )
    breaker_failures: int = Field(
        3, ge=1, description="Consecutive Redis errors after which the cache stops asking Redis for a while."
    )
    breaker_cooldown_seconds: float = Field(
        5.0,
        gt=0,
        description="How long the cache leaves Redis alone after repeated errors before trying again.",
    )

    @field_validator("password_file")
    @classmethod
    def _read_password_file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        if info.data.get("password") is not None:
            raise ValueError("set REDIS_PASSWORD or REDIS_PASSWORD_FILE, not both")
        if not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @field_validator("tls_ca_file")
    @classmethod
    def _ca_file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value

    def secret(self) -> str | None:
        """The password, from REDIS_PASSWORD or read from REDIS_PASSWORD_FILE."""
        if self.password_file is not None:
            return self.password_file.read_text().strip() or None
        return self.password.get_secret_value() if self.password is not None else None


class LangfuseSettings(BaseSettings):
    """Tracing (LANGFUSE_*)."""

    model_config = SettingsConfigDict(env_prefix="LANGFUSE_", extra="ignore")

    enabled: bool = Field(False, description="Send a trace per request to Langfuse.")
    host: str = Field("http://localhost:3000", description="Langfuse base URL.")
    public_key: str | None = Field(None, description="Langfuse public key (pk-...).")
    secret_key: SecretStr | None = Field(None, description="Langfuse secret key (sk-...).")
    public_key_file: Path | None = Field(
        None, description="File holding the public key (a mounted secret); instead of LANGFUSE_PUBLIC_KEY."
    )
    secret_key_file: Path | None = Field(
        None, description="File holding the secret key (a mounted secret); instead of LANGFUSE_SECRET_KEY."
    )
    capture_content: bool = Field(
        True,
        description="Send prompts and outputs with traces; false keeps only ids, timings, usage, parameters.",
    )
    timeout: int = Field(5, ge=1, le=60, description="Seconds one export request to Langfuse may take.")
    flush_interval: float = Field(
        1.0, gt=0, le=60, description="Seconds between background exports of traces."
    )
    flush_timeout_seconds: float = Field(
        5.0, gt=0, le=60, description="Longest wait at shutdown for the last traces to be exported."
    )

    @model_validator(mode="after")
    def _keys_when_enabled(self) -> LangfuseSettings:
        public = secret_from_file(self.public_key, self.public_key_file, "LANGFUSE_PUBLIC_KEY")
        if public is not None:
            self.public_key = public.get_secret_value()
        secret = secret_from_file(self.secret_key, self.secret_key_file, "LANGFUSE_SECRET_KEY")
        if secret is not None:
            self.secret_key = secret
        # Only a missing key is reported: the error message never carries a secret.
        if self.enabled and not (self.public_key and self.secret_key):
            raise ValueError(
                "LANGFUSE_ENABLED=true needs LANGFUSE_PUBLIC_KEY and LANGFUSE_SECRET_KEY (or their _FILE variants)"
            )
        return self


class ImageSettings(BaseSettings):
    """Images in requests (LLM_IMAGE_*): limits, and which hosts image URLs may be fetched from."""

    model_config = SettingsConfigDict(env_prefix="LLM_IMAGE_", extra="ignore")

    max_per_request: int = Field(4, ge=0, le=64, description="Most images one request may carry (0 = none).")
    max_bytes: int = Field(
        10 * 1024 * 1024, ge=1024, description="Largest encoded image (decoded data: URL or download) in bytes."
    )
    max_pixels: int = Field(
        16_777_216, ge=1024, description="Most pixels (width x height) one image may have."
    )
    fetch_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma list of hosts whose http(s) image URLs the service fetches (no redirects); "
        "empty (the default) accepts data: URLs only.",
    )
    fetch_timeout_seconds: int = Field(5, ge=1, le=60, description="Longest download of one image URL.")

    @field_validator("fetch_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip().lower() for part in value.split(",") if part.strip()]
        return value

    @field_validator("fetch_hosts")
    @classmethod
    def _plain_hosts(cls, value: list[str]) -> list[str]:
        bad = [host for host in value if "/" in host or ":" in host or "*" in host]
        if bad:
            raise ValueError(f"give host names only (no scheme, port, path or wildcard): {bad}")
        return [host.lower() for host in value]


class ChatSettings(BaseSettings):
    """Tool calling of every slot (each slot's template and parser are fields of its SlotSettings)."""

    model_config = SettingsConfigDict(env_prefix="LLM_", extra="ignore")

    tool_strict_level: Literal["auto", "function", "parameter"] = Field(
        "parameter",
        description="vLLM's --tool-strict-level for every slot: parameter makes each call's arguments follow its "
        "tool's JSON schema; auto only for tools marked strict.",
    )


class Settings(BaseModel):
    """The whole configuration; build with `load_settings()` from the environment."""

    app: AppSettings = Field(default_factory=lambda: AppSettings())
    llm: LLMSettings = Field(default_factory=lambda: LLMSettings())
    redis: RedisSettings = Field(default_factory=lambda: RedisSettings())
    langfuse: LangfuseSettings = Field(default_factory=lambda: LangfuseSettings())
    images: ImageSettings = Field(default_factory=lambda: ImageSettings())
    chat: ChatSettings = Field(default_factory=lambda: ChatSettings())


_SECTIONS: dict[str, type[BaseSettings]] = {
    "app": AppSettings,
    "llm": LLMSettings,
    "redis": RedisSettings,
    "langfuse": LangfuseSettings,
    "images": ImageSettings,
    "chat": ChatSettings,
}


def env_name(section: type[BaseSettings], field: str) -> str:
    """The environment variable that sets `field` of `section`."""
    return f"{section.model_config.get('env_prefix', '')}{field}".upper()


def known_env_vars() -> set[str]:
    """Every environment variable the settings read (the nested LLM_SLOTS__<SLOT>__<FIELD> form aside)."""
    fields = {env_name(cls, name) for cls in _SECTIONS.values() for name in cls.model_fields}
    return (fields - {"LLM_SLOTS"}) | builtin_env_vars()


def load_settings(**overrides: Any) -> Settings:
    """Read every section from the environment; raise SettingsError naming the bad variable."""
    sections: dict[str, Any] = {}
    problems: list[str] = []
    for key, cls in _SECTIONS.items():
        try:
            sections[key] = overrides.get(key) or cls()
        except ValidationError as exc:
            for error in exc.errors():
                if isinstance(error.get("ctx", {}).get("error"), SlotConfigError):
                    problems.append(str(error["ctx"]["error"]))
                    continue
                field = str(error["loc"][0]) if error["loc"] else ""
                problems.append(f"{env_name(cls, field)}: {error['msg']} (got {error.get('input')!r})")
    if len(problems) == 1:
        raise SettingsError(f"invalid settings: {problems[0]}")
    if problems:
        raise SettingsError("invalid settings:\n  " + "\n  ".join(problems))
    return Settings(**sections)
