"""A shorter schemathesis run against the real service (vLLM on the demo model): no 5xx, errors in the
envelope, responses as documented."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import ignored_auth, positive_data_acceptance

from tests.fuzz_checks import envelope_check

from .conftest import ServiceProcess

EXAMPLES = 6  # per operation and mode (valid and invalid data)
# Every fuzzed request ends within this (504 otherwise), so long generations do not stretch the run.
TIMEOUT_SECONDS = "3"


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
                # The shared service runs without API keys, so "a bad key gets 401" does not apply (the
                # fake-engine run has keys); for positive_data_acceptance see tests/unit/test_fuzz.py.
                case.call_and_validate(
                    headers={"X-Request-Timeout": TIMEOUT_SECONDS},
                    additional_checks=[envelope_check],
                    excluded_checks=[positive_data_acceptance, ignored_auth],
                    timeout=120,
                )

            run()
    print(f"\nfuzzed {sum(counts.values())} cases on the real engine: {counts}")
    assert sum(counts.values()) >= 50
