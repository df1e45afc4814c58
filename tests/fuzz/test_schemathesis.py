"""schemathesis against the app's own `/openapi.json` (every native route, authenticated).

The rule: no generated request gets a 5xx, and every answer has a documented
status and a body matching the documented schema. The SSE routes are left to
test_openapi_fuzz.py (their streams do not end by themselves). A short run in
`make test`; `BOOTHD_FUZZ_EXAMPLES=3000` (as `make faults` sets) for a long one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from tests.fuzz.test_openapi_fuzz import AUTH, Server

EXAMPLES = int(os.environ.get("BOOTHD_FUZZ_EXAMPLES", "0")) or 15


@pytest.fixture(scope="module")
def st_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(Path(tmp_path_factory.mktemp("schemathesis")) / "data")
    yield server
    server.close()


@pytest.fixture(scope="module")
def api_schema(st_server: Server) -> schemathesis.BaseSchema:
    url = f"http://127.0.0.1:{st_server.port}/openapi.json"
    return schemathesis.openapi.from_url(url).exclude(path_regex=r"/events$")


def test_generated_requests_follow_the_documented_contract(
    api_schema: schemathesis.BaseSchema,
) -> None:
    """No 5xx; every status is documented; every body matches its documented schema.

    Operations are driven with hypothesis directly: schemathesis' own pytest
    plugin does not load with this pytest version.
    """
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 15
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=not os.environ.get("BOOTHD_FUZZ_EXAMPLES"),
            database=None,
        )
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(
                headers=AUTH,
                checks=[not_a_server_error, status_code_conformance, response_schema_conformance],
            )

        check()
