"""A bounded property-based run over the server's OpenAPI schema with every schemathesis check on: whatever it
generates, the server answers with a documented status and never a 5xx, accepts what the schema calls valid and
refuses what it calls invalid.

The schema states the value ranges (`server/protocol.py`, the model's bounds filled in by
`server/openapi_bounds.py`). A few rules compare values in ways JSON Schema cannot say; a 400 for one of them
is the right answer to a schema-valid request, and RULES_IN_WORDS names each (any other rejection of valid data
fails the test).

CI keeps it to a few hundred requests; TOKENMILL_SCHEMATHESIS_EXAMPLES raises the count per operation
(issue 14's acceptance run: `benchmarks/schemathesis_run.sh`, at least 3,000 requests).
"""

from __future__ import annotations

import collections
import os
import re

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from schemathesis.core.failures import FailureGroup  # noqa: E402
from schemathesis.specs.openapi.checks import RejectedPositiveData  # noqa: E402

from tests.server.conftest import MODEL, start_server, stop_server  # noqa: E402
from tokenmill.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from tokenmill.engine.async_engine import AsyncLLMEngine  # noqa: E402
from tokenmill.engine.engine import LLMEngine  # noqa: E402
from tokenmill.server.app import build_app  # noqa: E402

EXAMPLES = int(os.environ.get("TOKENMILL_SCHEMATHESIS_EXAMPLES", "25"))
# Seconds a client waits for one answer: the acceptance run raises it on a shared machine, where a large
# generated request (n x prompts x logprobs) can queue behind other processes' work.
CLIENT_TIMEOUT = float(os.environ.get("TOKENMILL_SCHEMATHESIS_TIMEOUT", "60"))
# (error param, message) patterns of the rules JSON Schema cannot state, each with why.
RULES_IN_WORDS = {
    "function names are unique within a request (no JSON Schema keyword compares fields across a list)":
        (r"tools\[\d+\](\.function)?\.name", r"is already the name of"),
    "a named tool_choice names one of the request's tools (membership of a value in another field)":
        (r"tool_choice(\.function)?\.name", r"is not among the tools"),
    "a schema inside the request must be one the grammar compiler accepts (a schema about schemas)":
        (r"tools|tool_choice|response_format.*|text\.format.*", r"invalid JSON schema|could not be matched|took .* to compile"),
    "the prompt must fit the context in tokens (its token count is the tokenizer's to know)":
        (r"prompt|messages|input", r"max_model_len"),
}
STATUSES: list[int] = []
IN_WORDS: collections.Counter[str] = collections.Counter()


@pytest.fixture(scope="module")
def api_server(model_dir):
    # The checkpoint's whole context: generated prompts rarely come near it, so the token rule seldom applies.
    config = EngineConfig(model=str(model_dir), dtype="float32", max_model_len=1024, seed=0,
                          cache=CacheConfig(num_kv_blocks=1024),
                          scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=1024))
    engine = AsyncLLMEngine(LLMEngine(config))
    app = build_app(engine, MODEL, max_body_bytes=1 << 20)
    live = start_server(app, engine)
    yield live, app
    stop_server(live)
    print(f"\nschemathesis: {len(STATUSES)} requests, statuses {sorted(set(STATUSES))}, "
          f"5xx: {sum(s >= 500 for s in STATUSES)}, valid data refused by a rule in words: {dict(IN_WORDS)}")


@pytest.fixture(scope="module")
def api_schema(api_server):
    return schemathesis.openapi.from_dict(api_server[1].openapi())


schema = schemathesis.pytest.from_fixture("api_schema")


def _rule_in_words(response) -> str | None:
    """The RULES_IN_WORDS entry a 400 answers to, if any."""
    if response.status_code != 400:
        return None
    error = response.json().get("error", {})
    param, message = error.get("param") or "", error.get("message") or ""
    for rule, (param_pattern, message_pattern) in RULES_IN_WORDS.items():
        if re.fullmatch(param_pattern, param) and re.search(message_pattern, message):
            return rule
    return None


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_every_check_passes(case, api_server):
    live, _ = api_server
    for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        tokens = case.body.get(field) if isinstance(case.body, dict) else None
        if type(tokens) is int and tokens > 4:
            # Generated limits are huge: keep generations short so the run stays bounded in time. Only a
            # schema-valid integer is lowered (to another one), so no case changes from invalid to valid.
            case.body[field] = 4
    if isinstance(case.body, dict) and "messages" in case.body and not {"max_tokens", "max_completion_tokens"} & set(
            case.body):
        case.body["max_tokens"] = 4  # a chat request without a limit generates to the end of the context
    if isinstance(case.body, dict) and "input" in case.body and "max_output_tokens" not in case.body:
        case.body["max_output_tokens"] = 4  # the same for a response
    response = case.call(base_url=live.root, timeout=CLIENT_TIMEOUT)
    STATUSES.append(response.status_code)
    assert response.status_code < 500, (response.status_code, response.text[:500])
    try:
        case.validate_response(response)
    except FailureGroup as failures:
        rule = _rule_in_words(response)
        if rule is None or not all(isinstance(f, RejectedPositiveData) for f in failures.exceptions):
            raise
        IN_WORDS[rule] += 1
