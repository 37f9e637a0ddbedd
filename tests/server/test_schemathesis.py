"""A bounded property-based run over the server's OpenAPI schema: whatever schemathesis generates, the server
answers with a documented status and never a 5xx.

Every schemathesis check runs except positive_data_acceptance: value ranges (temperature >= 0, n <= 128,
best_of == n, ...) are SamplingParams' rules, not written into the schema, so schema-valid values outside
them get the 400 naming the field and the limit, as they must.

CI keeps it to a few hundred requests; TOKENMILL_SCHEMATHESIS_EXAMPLES raises the count per operation for
a longer run (issue 14's acceptance run: TOKENMILL_SCHEMATHESIS_EXAMPLES=1600, run with -s to see the count).
"""

from __future__ import annotations

import os

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

from tests.server.conftest import MODEL, make_engine, start_server, stop_server  # noqa: E402
from tokenmill.server.app import build_app  # noqa: E402

EXAMPLES = int(os.environ.get("TOKENMILL_SCHEMATHESIS_EXAMPLES", "60"))
SENT: list[int] = []  # status of every request sent, for the count and the summary printed at the end


@pytest.fixture(scope="module")
def api_server(model_dir):
    engine = make_engine(model_dir)
    app = build_app(engine, MODEL, max_body_bytes=1 << 20)
    live = start_server(app, engine)
    yield live, app
    stop_server(live)
    print(f"\nschemathesis: {len(SENT)} requests, statuses {sorted(set(SENT))}, 5xx: {sum(s >= 500 for s in SENT)}")


@pytest.fixture(scope="module")
def api_schema(api_server):
    return schemathesis.openapi.from_dict(api_server[1].openapi())


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_no_input_gets_a_5xx(case, api_server):
    live, _ = api_server
    tokens = case.body.get("max_tokens") if isinstance(case.body, dict) else None
    if type(tokens) is int and tokens > 4:
        # Generated max_tokens are huge: keep generations short so the run stays bounded in time. Only a
        # schema-valid integer is lowered (to another one), so no case changes from invalid to valid.
        case.body["max_tokens"] = 4
    response = case.call(base_url=live.root, timeout=60)
    SENT.append(response.status_code)
    assert response.status_code < 500, (response.status_code, response.text[:500])
    case.validate_response(response, excluded_checks=[positive_data_acceptance])
