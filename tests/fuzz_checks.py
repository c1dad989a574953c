"""A schemathesis check shared by the fuzz suites: every error answer is in its surface's JSON envelope."""

from __future__ import annotations

import json

import schemathesis


@schemathesis.check
def envelope_check(ctx, response, case) -> None:
    if response.status_code < 400:
        return None
    body = json.loads(response.content)
    error = body.get("error") if isinstance(body, dict) else None
    assert isinstance(error, dict), f"error without the envelope: {body!r}"
    keys = {"message", "type", "param"} | ({"code"} if case.path.startswith("/v1/") else set())
    assert set(error) == keys, f"envelope keys {sorted(error)} on {case.path}"
    assert isinstance(error["message"], str) and error["message"]
    if response.status_code in (429, 503) and case.path != "/health":
        assert "retry-after" in {k.lower() for k in response.headers}, "429/503 without Retry-After"
    return None

