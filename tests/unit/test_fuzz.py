"""Fuzzing from our own OpenAPI schema (schemathesis) on fake engines, in-process: no 5xx, every error in
its surface's envelope, every response as documented."""

from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import positive_data_acceptance

from llm_service.app import EngineBackend, create_app
from llm_service.config.settings import AppSettings, Settings
from tests.fuzz_checks import envelope_check, lift_deadline

from .conftest import GIB, FakeFactory, fake_settings

# Cases per operation; with the schema's 12 operations (some have few distinct inputs) this is well
# over 1000 cases in all, checked by test_enough_cases_were_fuzzed.
EXAMPLES = 100
MIN_CASES = 1000

API_KEY = "fuzz-key-0123456789"
ADMIN_TOKEN = "fuzz-admin-token"
# Keys on, so the documented security schemes are enforced (schemathesis checks that bad keys get 401).
settings_ = fake_settings(preload_models=["standard", "longctx"], api_keys=SecretStr(API_KEY))
settings_ = Settings(app=AppSettings(env="test", admin_token=SecretStr(ADMIN_TOKEN)), llm=settings_.llm)
app = create_app(settings_, EngineBackend(FakeFactory(), "cpu", 8 * GIB))
schema = schemathesis.openapi.from_asgi("/openapi.json", app)
cases: Counter[str] = Counter()


OPERATIONS = [result.ok() for result in schema.get_all_operations()]


# One test per operation, each with its own id: schemathesis' own `schema.parametrize()` gives every
# operation the same node id, which pytest-xdist (make test) takes for one test and runs once.
@pytest.mark.parametrize("operation", OPERATIONS, ids=[operation.label for operation in OPERATIONS])
def test_fuzzed_requests_get_documented_answers(operation: APIOperation) -> None:
    @given(case=st.one_of([operation.as_strategy(generation_mode=mode) for mode in GenerationMode]))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case: Case) -> None:
        cases[case.operation.label] += 1
        lift_deadline(case)
        # positive_data_acceptance is left out: some rules (prompt xor messages, unsupported OpenAI
        # fields) are not expressible in the JSON schema, so a schema-valid body may rightly get a 400.
        # Each call starts the app anew: a probe may meet the (fake) preload still running, and its
        # documented answer then is 503, not a server error.
        probe = [not_a_server_error] if operation.path.startswith("/health") else []
        case.call_and_validate(
            headers={"x-api-key": API_KEY, "Authorization": f"Bearer {ADMIN_TOKEN}"},
            additional_checks=[envelope_check],
            excluded_checks=[positive_data_acceptance, *probe],
        )

    run()


def test_enough_cases_were_fuzzed():
    if len(cases) < 2:
        pytest.skip("run together with test_fuzzed_requests_get_documented_answers")
    total = sum(cases.values())
    print(f"fuzzed {total} cases over {len(cases)} operations: {dict(cases)}")
    assert total >= MIN_CASES
