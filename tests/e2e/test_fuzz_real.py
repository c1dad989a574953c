"""A shorter schemathesis run against the real service (vLLM on the demo model): no 5xx, errors in the
envelope, responses as documented. Generations are bounded to a few tokens so the run stays short."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode
from schemathesis.specs.openapi.checks import ignored_auth, positive_data_acceptance

from tests.fuzz_checks import envelope_check, lift_deadline

from .conftest import ServiceProcess

EXAMPLES = 6  # per operation and mode (valid and invalid data)
# Far more than a bounded case takes: a request that still runs into it (504) is a hang, and fails.
TIMEOUT_SECONDS = "60"
# The tokens a fuzzed generation may ask for: the schema allows up to the context (absent means
# LLM_DEFAULT_MAX_TOKENS), which on the CPU engine is many seconds a case.
MAX_TOKENS = 16
GENERATION_PATHS = frozenset({"/generate", "/v1/completions", "/v1/chat/completions"})
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")


def bound_generation(case: Case) -> None:
    """Cap the tokens `case` asks for at MAX_TOKENS (ask for MAX_TOKENS when it names none); a value
    that is not a whole number above the cap (an invalid one) is left for the service to reject."""
    body = case.body
    if case.path not in GENERATION_PATHS or not isinstance(body, dict):
        return
    for name in TOKEN_FIELDS:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS:
            body[name] = MAX_TOKENS
    if not any(name in body for name in TOKEN_FIELDS):
        body["max_tokens"] = MAX_TOKENS


def test_fuzzed_requests_on_the_real_engine(service: ServiceProcess) -> None:
    schema = schemathesis.openapi.from_url(service.base_url + "/openapi.json")
    counts: dict[str, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def run(case) -> None:
                counts[case.operation.label] = counts.get(case.operation.label, 0) + 1
                bound_generation(case)
                lift_deadline(case)
                # The shared service runs without API keys, so "a bad key gets 401" does not apply (the
                # fake-engine run has keys); for positive_data_acceptance see tests/unit/test_fuzz.py.
                case.call_and_validate(
                    headers={"X-Request-Timeout": TIMEOUT_SECONDS},
                    additional_checks=[envelope_check],
                    excluded_checks=[positive_data_acceptance, ignored_auth],
                    timeout=120,
                )

            try:
                run()
            except Unsatisfiable:
                # An operation with no parameters or body (GET /v1/models) has no invalid form to send.
                if mode is not GenerationMode.NEGATIVE:
                    raise
    print(f"\nfuzzed {sum(counts.values())} cases on the real engine: {counts}")
    assert sum(counts.values()) >= 50
