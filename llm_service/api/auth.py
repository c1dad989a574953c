"""API keys (LLM_API_KEYS / LLM_API_KEYS_FILE) on the generation, OpenAI and admin routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from llm_service.api.deps import ResourcesDep
from llm_service.errors import Unauthorized

# auto_error=False: a missing key is our 401 in our envelope, not FastAPI's 403. Declaring both
# schemes documents them in the OpenAPI schema.
_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>` (one of LLM_API_KEYS).")
_header = APIKeyHeader(name="x-api-key", auto_error=False, description="`x-api-key: <key>` (one of LLM_API_KEYS).")


async def require_api_key(
    resources: ResourcesDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    x_api_key: Annotated[str | None, Depends(_header)],
) -> None:
    """Allow the request when no keys are configured, or with a valid key in either header."""
    keys = resources.api_keys
    if not keys.required:
        return
    if keys.accepts(x_api_key) or keys.accepts(bearer.credentials if bearer else None):
        return
    raise Unauthorized("a valid API key is required: `Authorization: Bearer <key>` or `x-api-key: <key>`")


ApiKeyDep = Depends(require_api_key)
