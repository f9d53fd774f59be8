"""A bounded schemathesis run against /openapi.json over the real app (SQLite, the session's Redis, the
default model for chat and score; the document itself caps `max_tokens` at the deployment's
MAX_NEW_TOKENS, set small here): no request, whether it conforms to the document or breaks it, is answered
with a server error or a status code the document does not list, and no request that conforms to it is
refused ("valid request rejected") except for what the generator cannot know (listed below)."""

from __future__ import annotations

import dataclasses
import re
import shutil

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import positive_data_acceptance, status_code_conformance

from service import create_app
from service.auth import create_key
from service.settings import Settings
from service.store import db

MAX_TOKENS = 2
EXAMPLES_PER_OPERATION = 12
# Prefill on the CPU is what a chat or a score costs here: conforming ones keep at most this many messages
# (questions, options) of at most this many characters (a shorter conforming request still conforms).
MAX_PARTS, MAX_CHARS = 4, 64


# What a conforming request may still be refused with, because it depends on state the generator cannot
# know: 404, an id (in the path or the body) that names nothing in this tenant (the tenant is empty);
# 409, a resource's state (a profile not ready, a stopped experiment). Not 429: the request and token
# limits are off here, so a 429 would be a fault. Not 413: no generated body comes near MAX_BODY_BYTES.
STATE_DEPENDENT = ["2xx", "404", "409"]

# 422s on conforming requests for rules JSON Schema cannot state (they relate two fields, count tokens or
# read the clock), by operation: a pattern of the field the error names (and of its message, after a space
# where the field alone would admit more). The document's descriptions state them in prose.
UNSTATED_RULES: dict[str, dict[str, str]] = {
    "GET /v1/profiles": {r"subject_kind": "subject_id needs subject_kind (two query parameters)"},
    "POST /v1/chat/completions": {
        r"max_tokens": "max_tokens and max_completion_tokens agree when both are given",
        r"messages.*": "the prompt fits the model's context, counted in tokens",
        r"model": "a profile is named in `model` or in `steering`, not both",
        r"steering\.groups_weight": "groups_weight needs `user` and no profiles (fields of two objects)",
    },
    "POST /v1/score": {
        r"questions\[\d+\]\.(target|ordinal|answer)": "one target and ordinal entry per option, the target "
                                                      "sums to 1, an answer names one of the options",
        r"questions\[\d+\]\.question": "the question's prompt fits the model's context, counted in tokens",
        r"steering\.groups_weight": "groups_weight needs `user` and no profiles (fields of two objects)",
    },
    "POST /v1/users/{uid}/opinions": {
        r"items\[\d+\]\.(target|ordinal|answer)": "one target and ordinal entry per option, the target sums "
                                                  "to 1, an answer names one of the options",
        r"items\[\d+\]\.(id|question) the same item as .*": "one item (by id, else question and options) once "
                                                          "a request",
        r"body the uploaded file is empty": "an uploaded file holds at least one item",
    },
    "POST /v1/experiments": {
        r"control": "the control names one of the body's variants",
        r"variants\[\d+\]\.name": "variant names are unique within the body",
        r"variants": "the traffic weights sum to more than 0",
        r"variants\[\d+\]\.profiles\[\d+\]\.id profile .* appears twice .*": "a profile appears once in a blend",
        r"ends_at": "ends_at lies after starts_at and in the future (the clock)",
    },
    "PATCH /v1/experiments/{experiment_id}": {r"ends_at": "ends_at lies in the future (the clock)"},
    "POST /v1/profiles": {r"params\.(?!(layer|strength|positions|orders)$).*": "the method's own parameters, "
                                                                               "checked by the method",
                          r"subject": "the subject holds opinions (the database's state)"},
    "POST /v1/populations": {r"subjects(\[\d+\])?": "the subjects exist, hold opinions and share enough "
                                                      "questions (the database's state)"},
    "GET /v1/populations/{population_id}/questions": {r"subject_kind": "subject_id and subject_kind come "
                                                                      "together (two query parameters)"},
    "POST /v1/profiles/import": {r"adapter_config.*|adapter_model": "the adapter's content: peft's config and "
                                                                    "the safetensors weights"},
}
UNSTATED_RULES["POST /v1/groups/{gid}/opinions"] = UNSTATED_RULES["POST /v1/users/{uid}/opinions"]


def shorten_prompt(case) -> None:  # noqa: ANN001
    """Cut a chat's messages or a score's questions (in place) to `MAX_PARTS` texts of `MAX_CHARS`."""
    body = case.body
    if not isinstance(body, dict):
        return
    if case.operation.label == "POST /v1/chat/completions":
        parts = body.get("messages")
    elif case.operation.label == "POST /v1/score":
        parts = body.get("questions")
    else:
        return
    if not isinstance(parts, list):
        return
    del parts[MAX_PARTS:]
    for part in parts:
        for name, value in list(part.items()) if isinstance(part, dict) else ():
            if isinstance(value, str):
                part[name] = _shorter(value)
            elif isinstance(value, list):  # content parts, options, targets
                del value[MAX_PARTS:]
                for i, sub in enumerate(value):
                    if isinstance(sub, str):
                        value[i] = _shorter(sub)
                    elif isinstance(sub, dict) and isinstance(sub.get("text"), str):
                        sub["text"] = _shorter(sub["text"])


def _shorter(text: str) -> str:
    """At most MAX_CHARS of `text`, not blank unless `text` is."""
    return text[:MAX_CHARS] if text[:MAX_CHARS].strip() or not text.strip() else text.strip()[:MAX_CHARS]


def unstated_rule(case, response) -> str | None:  # noqa: ANN001
    """Why a conforming request's 422 is expected (an `UNSTATED_RULES` entry), or None."""
    if response.status_code != 422:
        return None
    error = response.json().get("error") or {}
    field = error.get("field") or ""
    rules = UNSTATED_RULES.get(case.operation.label, {})
    said = f"{field} {error.get('message')}"
    return next((why for pattern, why in rules.items()
                 if re.fullmatch(pattern, field, re.S) or re.fullmatch(pattern, said, re.S)), None)


def test_no_request_gets_a_server_error_or_a_valid_one_refused(tmp_path, redis_url, sqlite_template):
    shutil.copy(sqlite_template, tmp_path / "pluristeer.db")
    s = Settings.from_env(home=tmp_path, database_url=f"sqlite:///{tmp_path / 'pluristeer.db'}",
                          redis_url=redis_url, artifact_dir=tmp_path / "artifacts")
    app = create_app({"SETTINGS": dataclasses.replace(s, max_new_tokens=MAX_TOKENS, rate_limit_per_minute=0,
                                                      tokens_per_minute=0),
                      "TESTING": True})
    with db.session_scope(s) as session:
        headers = {"Authorization": f"Bearer {create_key(session, 'fuzz')}"}
    config = schemathesis.Config.from_dict(
        {"checks": {"positive_data_acceptance": {"expected-statuses": STATE_DEPENDENT}}})
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app, config=config)
    failures: list[str] = []
    calls = {"positive": 0, "negative": 0}
    try:
        for result in schema.get_all_operations():
            operation = result.ok()
            cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                              operation.as_strategy(GenerationMode.NEGATIVE))

            @given(case=cases)
            @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def run(case):  # noqa: ANN001
                positive = case.meta.generation.mode.is_positive
                calls["positive" if positive else "negative"] += 1
                if positive:
                    shorten_prompt(case)
                try:
                    response = case.call(headers=headers)
                    checks = [not_a_server_error, status_code_conformance]
                    if positive and unstated_rule(case, response) is None:
                        checks.append(positive_data_acceptance)
                    case.validate_response(response, checks=checks, headers=headers)
                except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - every failing operation is reported
                    failures.append(f"{case.operation.label}: {str(exc)[:800]}")

            run()
    finally:
        from service.api.chat import stop_engine

        stop_engine(app)
    assert min(calls.values()) >= EXAMPLES_PER_OPERATION, calls
    assert not failures, "\n\n".join(failures)
