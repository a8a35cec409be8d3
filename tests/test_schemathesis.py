"""Property-based fuzzing of the OpenAPI schema: no generated input may produce a 5xx."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from bench.live_server import LiveServer


def test_no_server_errors_for_generated_inputs():
    # A short context keeps generated max_tokens either tiny (fast) or refused (400).
    env = {"DGSERVE_MAX_MODEL_LEN": "48", "DGSERVE_DEFAULT_MAX_TOKENS": "4"}
    with LiveServer.dgserve("configs/tiny.yaml", env=env) as server:
        server.wait_ready()
        schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models"}
        for operation in operations:

            @given(case=operation.as_strategy())
            @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
            def check(case):  # type: ignore[no-untyped-def]
                response = case.call(timeout=60)
                case.validate_response(response, checks=[not_a_server_error])

            check()
