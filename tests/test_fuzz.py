"""Property-based requests (schemathesis) against the running server's own /openapi.json.

Every route gets generated requests, valid and invalid per its published schema. The test
fails on any 5xx, on a response that does not match the schema the API publishes, and on a
refusal that takes more than a few seconds. `--max-job-seconds` bounds what a generated
(valid) job may cost, so the run finishes in about a minute on a 2-core CI machine; the
server must keep serving to the end (checked after the run). Routes that change the
server's state for every later request (unloading the model) are left out.
"""
from __future__ import annotations

import time

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

EXAMPLES = 30  # per route
SLOW_REFUSAL = 5.0  # seconds: a 4xx must come back faster than this
SKIP_ROUTES = {"/sdapi/v1/unload-checkpoint", "/sdapi/v1/reload-checkpoint"}
STATS = {"cases": 0, "server_errors": 0, "worst_refusal": 0.0}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.server import start_server
    from tests.tiny_sd import build_tiny_sd

    root = tmp_path_factory.mktemp("fuzz")
    model = build_tiny_sd(root / "models" / "tiny-sd")
    srv = start_server(model, "--nowebui", "--max-job-seconds", "0.3", "--outdir-samples", str(root / "out"),
                       "--embeddings-dir", str(root / "embeddings"))  # create/embedding writes there
    yield srv
    srv.stop()


def operations(url: str):
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    schema.config.base_url = url
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path not in SKIP_ROUTES:
            yield operation



def check(case) -> None:
    """One generated request: no 5xx, the published schema's status codes, content type and body, a quick 4xx."""
    start = time.perf_counter()
    response = case.call(timeout=60)
    elapsed = time.perf_counter() - start
    STATS["cases"] += 1
    STATS["server_errors"] += response.status_code >= 500
    if 400 <= response.status_code < 500:
        STATS["worst_refusal"] = max(STATS["worst_refusal"], elapsed)
        assert elapsed < SLOW_REFUSAL, f"{case.method} {case.path} took {elapsed:.1f} s to be refused"
    c = schemathesis.checks
    case.validate_response(response, checks=[c.not_a_server_error, c.status_code_conformance,
                                             c.content_type_conformance, c.response_schema_conformance])


def test_every_route_answers_by_its_schema(server):
    import requests
    from hypothesis import given

    failures = []
    for operation in operations(server.url):
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def fuzz(case):
            check(case)

        try:
            fuzz()
        except (Exception, BaseExceptionGroup) as e:  # noqa: BLE001 - every route is tried, failures reported together
            failures.append(f"{operation.method.upper()} {operation.path}: {type(e).__name__}: {str(e)[:600]}")
    print(f"\nfuzz: {STATS['cases']} cases, {STATS['server_errors']} 5xx, "
          f"worst refusal {STATS['worst_refusal']:.2f} s")
    assert requests.get(server.url + "/sdapi/v1/samplers", timeout=10).status_code == 200  # still serving
    assert not failures, "\n".join(failures)
