"""A bounded schemathesis run against /openapi.json over the real app (SQLite, the session's Redis, the
default model for chat and score with `max_tokens` kept small): no request, whether it conforms to the
document or breaks it, is answered with a server error or a status code the document does not list."""

from __future__ import annotations

import dataclasses
import shutil

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import status_code_conformance

from service import create_app
from service.auth import create_key
from service.settings import Settings
from service.store import db

MAX_TOKENS = 2
EXAMPLES_PER_OPERATION = 12


def test_no_request_gets_a_server_error(tmp_path, redis_url, sqlite_template):
    shutil.copy(sqlite_template, tmp_path / "pluristeer.db")
    s = Settings.from_env(home=tmp_path, database_url=f"sqlite:///{tmp_path / 'pluristeer.db'}",
                          redis_url=redis_url, artifact_dir=tmp_path / "artifacts")
    app = create_app({"SETTINGS": dataclasses.replace(s, max_new_tokens=MAX_TOKENS, rate_limit_per_minute=0),
                      "TESTING": True})
    with db.session_scope(s) as session:
        headers = {"Authorization": f"Bearer {create_key(session, 'fuzz')}"}
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    failures: list[str] = []
    calls = 0
    try:
        for result in schema.get_all_operations():
            operation = result.ok()
            cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                              operation.as_strategy(GenerationMode.NEGATIVE))

            @given(case=cases)
            @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def run(case):  # noqa: ANN001
                nonlocal calls
                if isinstance(case.body, dict):
                    for name in ("max_tokens", "max_completion_tokens"):
                        if isinstance(case.body.get(name), int) and case.body[name] > MAX_TOKENS:
                            case.body[name] = MAX_TOKENS
                calls += 1
                try:
                    case.call_and_validate(headers=headers, checks=[not_a_server_error, status_code_conformance])
                except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - every failing operation is reported
                    failures.append(f"{case.operation.label}: {str(exc)[:800]}")

            run()
    finally:
        from service.api.chat import stop_engine

        stop_engine(app)
    assert calls >= 2 * EXAMPLES_PER_OPERATION
    assert not failures, "\n\n".join(failures)
