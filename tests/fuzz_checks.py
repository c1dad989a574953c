"""A schemathesis check shared by the fuzz suites: every error answer is in its surface's JSON envelope."""

from __future__ import annotations

import json

import schemathesis


@schemathesis.check
def envelope_check(ctx, response, case) -> None:
    # The probes answer with their own status object (documented: the schema checks validate it).
    if response.status_code < 400 or case.path.startswith("/health"):
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



# A valid deadline shorter than this is the client asking for a 504 (its own deadline passing is
# tested on its own); fuzzed cases get at least this long, so any 5xx left is the service's fault.
MIN_FUZZ_DEADLINE_SECONDS = 30.0


def lift_deadline(case) -> None:
    """Raise a positive `timeout` in the body or X-Request-Timeout header below
    MIN_FUZZ_DEADLINE_SECONDS to it; invalid values (zero, negative, not a number) stay for the
    service to reject with a 400."""
    body = case.body
    if isinstance(body, dict):
        value = body.get("timeout")
        if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < MIN_FUZZ_DEADLINE_SECONDS:
            body["timeout"] = MIN_FUZZ_DEADLINE_SECONDS
    for name in list(case.headers or {}):
        if name.lower() != "x-request-timeout":
            continue
        try:
            seconds = float(case.headers[name])
        except (TypeError, ValueError):
            continue
        if 0 < seconds < MIN_FUZZ_DEADLINE_SECONDS:
            case.headers[name] = str(MIN_FUZZ_DEADLINE_SECONDS)
