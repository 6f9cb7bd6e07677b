"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis):
no 5xx, and every response matches the schema (statuses, content types, bodies).

The cases come from schemathesis' strategies and are run by Hypothesis directly (its
pytest plugin does not load under this pytest), a bounded number per operation."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from pydantic import SecretStr

from tests.service.service_helpers import running_service

pytestmark = pytest.mark.integration


schemathesis = pytest.importorskip("schemathesis")
EXAMPLES_PER_OPERATION = 25
KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def test_api_conforms_to_its_schema(settings_fixture, extractor, record):
    with running_service(settings_fixture, extractor) as (client, _):
        schema = schemathesis.openapi.from_url(str(client.base_url.join("/openapi.json")))
        operations = [result.ok() for result in schema.get_all_operations()]
        labels, statuses = [], {}
        for operation in operations:

            @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True,
                      suppress_health_check=list(HealthCheck), database=None)
            @given(case=operation.as_strategy())
            def fuzz(case):
                # A schema can say "a base64 string" but not "a decodable image", so valid-
                # looking bytes may rightly get 400: that one check does not apply here.
                # With the key; schemathesis also replays cases without it (expects 401).
                response = case.call_and_validate(
                    headers=AUTH, timeout=60,
                    excluded_checks=[schemathesis.checks.positive_data_acceptance])
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                assert response.status_code < 500

            fuzz()
            labels.append(operation.label)
    assert {"POST /features", "POST /correspond", "GET /v1/models"} <= set(labels)
    sent = sum(statuses.values())
    record(fault=f"schema-driven fuzzing ({len(labels)} operations)", sent=sent,
           succeeded=sum(v for k, v in statuses.items() if k < 400),
           refused=sum(v for k, v in statuses.items() if 400 <= k < 500), errors=0, lost=0,
           notes=f"statuses {dict(sorted(statuses.items()))}")


@pytest.fixture
def settings_fixture(settings):  # `settings` is taken by Hypothesis' decorator above
    return settings.model_copy(update={"api_key": SecretStr(KEY)})
