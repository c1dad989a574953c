"""Per-request cache controls, from the body (`cache: {...}`) and the Cache-Control header."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, Field

# A year: longer lifetimes are not useful, and Redis refuses expiries past its own limit.
MAX_TTL_SECONDS = 365 * 24 * 3600


class CacheOptions(BaseModel):
    """The `cache` object of a request body (LiteLLM's vocabulary)."""

    no_cache: bool = Field(False, description="Skip the cache read (still store the result).")
    no_store: bool = Field(False, description="Do not store the result.")
    ttl: int | None = Field(
        None, ge=1, le=MAX_TTL_SECONDS, description="Seconds the stored result lives (at most a year)."
    )
    use_cache: bool | None = Field(
        None, description="true caches even a non-reproducible request; false bypasses the cache."
    )


@dataclass(frozen=True)
class CacheControl:
    """What one request allows the cache to do."""

    no_cache: bool = False  # skip the read
    no_store: bool = False  # skip the write
    ttl: int | None = None  # None = the default TTL
    force: bool | None = None  # True: cache even if not reproducible; False: bypass entirely

    @classmethod
    def parse(cls, header: str | None, options: CacheOptions | None = None) -> CacheControl:
        """Merge a Cache-Control header with body options; either may be absent."""
        no_cache = no_store = False
        ttl: int | None = None
        for directive in (header or "").split(","):
            name, _, value = directive.strip().lower().partition("=")
            if name == "no-cache":
                no_cache = True
            elif name == "no-store":
                no_store = True
            elif name in ("max-age", "s-maxage") and value.strip().strip('"').isdigit():
                seconds = int(value.strip().strip('"'))
                if seconds == 0:
                    no_store = True
                else:
                    ttl = min(seconds, MAX_TTL_SECONDS)
        if options is not None:
            no_cache = no_cache or options.no_cache
            no_store = no_store or options.no_store
            ttl = options.ttl or ttl
            return cls(no_cache, no_store, ttl, options.use_cache)
        return cls(no_cache, no_store, ttl)
