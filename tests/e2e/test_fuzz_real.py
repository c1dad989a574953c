"""A shorter schemathesis run against the real service (vLLM on the demo model): no 5xx, errors in the
envelope, responses as documented."""

from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import ignored_auth, positive_data_acceptance

from tests.fuzz_checks import envelope_check

from .conftest import ServiceProcess

EXAMPLES = 8
# Every fuzzed request ends within this (504 otherwise), so long generations do not stretch the run.
TIMEOUT_SECONDS = "3"
cases: Counter[str] = Counter()


@pytest.fixture(scope="module")
def real_schema(service: ServiceProcess):
    return schemathesis.openapi.from_url(service.base_url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("real_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_fuzzed_requests_on_the_real_engine(case):
    cases[case.operation.label] += 1
    # The shared service runs without API keys, so the "bad key gets 401" check does not apply; the
    # fake-engine run has keys and checks it. For positive_data_acceptance see tests/unit/test_fuzz.py.
    case.call_and_validate(
        headers={"X-Request-Timeout": TIMEOUT_SECONDS},
        additional_checks=[envelope_check],
        excluded_checks=[positive_data_acceptance, ignored_auth],
        timeout=120,
    )


def test_real_fuzz_case_count():
    if not cases:
        pytest.skip("run together with test_fuzzed_requests_on_the_real_engine")
    print(f"\nfuzzed {sum(cases.values())} cases on the real engine: {dict(cases)}")
