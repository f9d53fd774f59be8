"""Generation under steering: `POST /v1/chat/completions` (OpenAI-compatible, SSE streaming) and
`POST /v1/score` (answer distributions of multiple-choice questions).

Routes are thin: parse, resolve the request's steering to one `RowSteering` (profiles through the
profile cache, checked for tenant, status and model), hand it to the process's `GenerationEngine`
(started with the first request that needs it), and turn the result into JSON or an event stream.
The engine's thread owns the model; nothing here touches it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flask import Blueprint, Flask, Response, current_app

from service import context, db
from service.auth import tenant_id
from service.engine import EngineStopped, GenerationEngine, GenerationFailed, GenerationHandle, SamplingParams
from service.errors import ApiError, not_found
from service.openapi import api_route
from service.protocol import (
    AppliedProfile,
    CalibrationOut,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatMessageOut,
    ChunkChoice,
    ProfileWeight,
    QuestionScore,
    ScoreRequest,
    ScoreResponse,
    SteeringIn,
    SteeringOut,
    Usage,
)
from service.settings import Settings
from steer_core.calibration import IDENTITY, Calibration, blend_calibration, recorded_calibration
from steer_core.data import OpinionItem, make_item
from steer_core.errors import SteerError
from steer_core.metrics import summarize
from steer_core.models import LanguageModel
from steer_core.steering import Intervention, RowSteering, compose

log = logging.getLogger(__name__)

bp = Blueprint("chat", __name__)

ENGINE = "pluristeer.engine"
# Seconds a request waits for the engine's next token before giving up (and freeing its slot).
TOKEN_TIMEOUT_S = 300.0
# Methods whose displacement exists at prefill only (COLD-FD needs the whole prompt in one call).
PROMPT_ONLY_METHODS = frozenset({"cold_fd"})


# ------------------------------------------------------------------------------------------- the engine

class EngineSlot:
    """The app's generation engine, created by the first request that needs it (loading the model)."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.engine: GenerationEngine | None = None
        self.error: str | None = None
        # (artifact sha256, model fingerprint, positions override) -> (intervention, profile layer, strength),
        # most recent last
        self.interventions: OrderedDict[tuple[str, str, str | None], tuple[Intervention, int, float]] = OrderedDict()
        self.interventions_lock = threading.Lock()

    def get(self) -> GenerationEngine:
        with self.lock:
            if self.engine is None:
                settings: Settings = context.state(self.app).settings
                try:
                    lm = self.app.config.get("GENERATION_MODEL") or _load(settings.model)
                except SteerError as exc:
                    self.error = f"cannot load {settings.model!r}: {exc.message}"
                    raise ApiError(503, "unavailable", self.error, "model") from None
                self.engine = GenerationEngine(lm, max_batch_size=settings.max_batch_size,
                                               batch_wait_ms=settings.batch_wait_ms,
                                               max_new_tokens=settings.max_new_tokens).start()
                self.error = None
            return self.engine

    def probe(self) -> dict[str, Any]:
        engine = self.engine
        return {"loaded": engine is not None and engine.running, "error": self.error}

    def stop(self) -> None:
        with self.lock:
            if self.engine is not None:
                self.engine.stop()
                self.engine = None


def _load(name: str) -> LanguageModel:
    from steer_core.models import load_model

    return load_model(name)


def init_app(app: Flask) -> None:
    """Register the chat blueprint, the engine slot (nothing is loaded yet), its readiness probe and its
    metrics."""
    slot = EngineSlot(app)
    app.extensions[ENGINE] = slot
    context.state(app).model_probe = slot.probe
    app.register_blueprint(bp)
    from service.observability import EXTENSION as METRICS

    metrics = app.extensions.get(METRICS)
    if metrics is not None:
        metrics.registry.register(_EngineCollector(slot))


def engine(app: Flask | None = None) -> GenerationEngine:
    """The app's generation engine (started on first use)."""
    return (app or current_app).extensions[ENGINE].get()


def stop_engine(app: Flask) -> None:
    """Stop the app's engine thread (tests, shutdown); a later request starts a new one."""
    slot: EngineSlot | None = app.extensions.get(ENGINE)
    if slot is not None:
        slot.stop()


class _EngineCollector:
    def __init__(self, slot: EngineSlot) -> None:
        self.slot = slot

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        eng = self.slot.engine
        stats = eng.stats if eng is not None else None
        yield GaugeMetricFamily("pluristeer_generation_active_rows", "rows in the engine's running batch",
                                value=stats.active_rows if stats else 0)
        yield GaugeMetricFamily("pluristeer_generation_queued", "generation requests waiting for a batch slot",
                                value=eng.queue_depth() if eng is not None else 0)
        yield CounterMetricFamily("pluristeer_generation_tokens", "tokens generated",
                                  value=stats.tokens if stats else 0)
        yield CounterMetricFamily("pluristeer_generation_steps", "decode steps run", value=stats.steps if stats else 0)
        finished = CounterMetricFamily("pluristeer_generation_requests", "generation requests finished",
                                       labels=["outcome"])
        if stats:
            finished.add_metric(["failed"], stats.failed)
            finished.add_metric(["cancelled"], stats.cancelled)
            finished.add_metric(["completed"], stats.finished - stats.failed - stats.cancelled)
        yield finished


# ------------------------------------------------------------------------------------------- steering

@dataclass
class Resolved:
    steering: RowSteering | None
    applied: SteeringOut


@dataclass
class _Ref:
    id: str
    weight: float
    field: str


def parse_model(name: str | None, settings: Settings, field: str = "model") -> tuple[str, str | None]:
    """`base` or `base:profile_id` -> (base, profile id or None); only the deployment's model is served."""
    if not name or name == settings.model:
        return settings.model, None
    prefix = settings.model + ":"
    if name.startswith(prefix) and len(name) > len(prefix):
        return settings.model, name[len(prefix):]
    raise ApiError(422, "validation_error", f"model {name!r} is not served here; use {settings.model!r} "
                   f"(or '{settings.model}:<profile id>')", field)


def resolve_steering(eng: GenerationEngine, spec: SteeringIn | None, shorthand: str | None,
                     user: str | None) -> Resolved:
    """The request's blend as one `RowSteering`, checked for this tenant, status and model."""
    session = context.session()
    settings = context.settings()
    tenant = tenant_id()
    refs: list[_Ref] = []
    out = SteeringOut(source="none", profiles=[], user=user)
    if shorthand is not None:
        if spec is not None and (spec.profiles or spec.experiment):
            raise ApiError(422, "validation_error", "name the profile in `model` or in `steering`, not both",
                           "model")
        refs, out.source = [_Ref(shorthand, 1.0, "model")], "model"
    elif spec is not None and spec.experiment is not None:
        if spec.profiles:
            raise ApiError(422, "validation_error", "give `profiles` or an `experiment`, not both",
                           "steering.experiment")
        from service import experiments

        variant, blend = experiments.resolve_experiment(session, tenant, spec.experiment, user)
        refs = [_Ref(pid, w, "steering.experiment") for pid, w in blend]
        out.source, out.experiment, out.variant = "experiment", spec.experiment, variant
    elif spec is not None and spec.profiles is not None:
        refs = [_Ref(p.id, float(p.weight), f"steering.profiles[{i}].id") for i, p in enumerate(spec.profiles)]
        out.source = "request"
    elif user is not None:
        refs = _user_refs(session, tenant, settings, user, spec.groups_weight if spec is not None else None)
        out.source = "user" if refs else "none"
    if spec is not None and spec.groups_weight is not None and (out.source not in ("user", "none") or user is None):
        raise ApiError(422, "validation_error", "groups_weight applies to a user's default profile only "
                       "(a request with `user` and no profiles)", "steering.groups_weight")
    if len(refs) > settings.max_profiles_per_request:
        raise ApiError(422, "validation_error", f"at most {settings.max_profiles_per_request} profiles in one "
                       f"blend, got {len(refs)}", "steering.profiles")
    positions = spec.positions if spec is not None else None
    out.positions = positions
    weighted: list[tuple[Intervention, float]] = []
    for ref in refs:
        row = _ready_profile(session, tenant, settings, ref)
        iv, layer, strength = _intervention(eng, row, positions, ref.field)
        weighted.append((iv, ref.weight))
        out.profiles.append(AppliedProfile(id=row.id, weight=ref.weight, version=row.version, method=row.method,
                                           layer=layer, strength=strength))
    return Resolved(steering=compose(weighted) if weighted else None, applied=out)


def _user_refs(session: db.Session, tenant: int, settings: Settings, uid: str,
               groups_weight: float | None) -> list[_Ref]:
    user = db.get_user(session, tenant, uid)
    if user is None:
        if groups_weight is not None:
            raise not_found(f"user {uid!r}", "user")
        return []  # an unknown end user is served unsteered, as OpenAI's `user` is free-form
    refs = []
    if user.default_profile_id is not None:
        refs.append(_Ref(user.default_profile_id, 1.0, "user"))
    if groups_weight is not None:
        for group in db.user_groups(session, tenant, user.id):
            newest = next((p for p in db.list_profiles(session, tenant, kind="group", subject_id=group.id,
                                                       status="ready", limit=50) if p.model == settings.model),
                          None)
            if newest is not None:
                refs.append(_Ref(newest.id, float(groups_weight), "user"))
    return refs


def _ready_profile(session: db.Session, tenant: int, settings: Settings, ref: _Ref) -> db.ProfileRow:
    row = db.get_profile(session, tenant, ref.id) if isinstance(ref.id, str) else None
    if row is None:
        raise not_found(f"profile {ref.id!r}", ref.field)  # another tenant's profile is just not found
    if row.status != "ready" or row.artifact_sha256 is None:
        raise ApiError(409, "profile_not_ready", f"profile {row.id} is {row.status}; only ready profiles "
                       "steer generation", ref.field)
    if row.model != settings.model:
        raise ApiError(422, "profile_model_mismatch", f"profile {row.id} was built for model {row.model!r}; "
                       f"this server serves {settings.model!r}", ref.field)
    return row


def _intervention(eng: GenerationEngine, row: db.ProfileRow, positions: str | None,
                  field: str) -> tuple[Intervention, int, float]:
    """The profile's intervention at its own strength (cached per artifact), with its layer and strength."""
    from service.artifacts import ArtifactError
    from steer_core.methods import intervention

    slot: EngineSlot = current_app.extensions[ENGINE]
    sha = row.artifact_sha256
    assert sha is not None
    key = (sha, eng.lm.fingerprint, positions)
    with slot.interventions_lock:
        cached = slot.interventions.get(key)
        if cached is not None:
            slot.interventions.move_to_end(key)
            return cached
    if positions not in (None, "prompt") and row.method in PROMPT_ONLY_METHODS:
        raise ApiError(422, "validation_error", f"{row.method} profiles steer prompt positions only",
                       "steering.positions")
    try:
        profile = context.profile_cache().load(sha)  # LRU -> Redis -> store; every read checks the sha256
    except ArtifactError as exc:
        raise ApiError(409, "profile_unavailable", f"profile {row.id}'s artifact is unavailable: {exc}",
                       field) from None
    try:
        iv = intervention(profile, eng.lm)  # checks the model fingerprint and the layer
    except SteerError as exc:
        raise ApiError(422, "profile_model_mismatch", f"profile {row.id}: {exc.message}", field) from None
    if positions is not None and positions != iv.positions:
        if not dataclasses.is_dataclass(iv):
            raise ApiError(422, "validation_error", f"{row.method} profiles cannot change positions",
                           "steering.positions")
        iv = dataclasses.replace(iv, positions=positions)  # type: ignore[type-var]
    entry = (iv, profile.layer, float(profile.strength))
    with slot.interventions_lock:
        slot.interventions[key] = entry
        while len(slot.interventions) > max(1, context.settings().profile_lru_size):
            slot.interventions.popitem(last=False)
    return entry


def score_blend(items: Sequence[OpinionItem], blend: Sequence[tuple[str, float]],
                field: str = "steering") -> list[np.ndarray]:
    """Answer distributions of `items` under a blend of this tenant's profiles `[(id, weight)]`, read on the
    serving engine (for experiments' offline comparison; call inside a request)."""
    eng = engine()
    spec = SteeringIn(profiles=[ProfileWeight(id=pid, weight=float(w)) for pid, w in blend])
    try:
        resolved = resolve_steering(eng, spec, None, None)
    except ApiError as exc:
        if exc.field and exc.field.startswith("steering.profiles"):
            exc.field = field
        raise
    rows = [resolved.steering] * len(items) if resolved.steering else None
    return eng.score(items, rows, timeout=TOKEN_TIMEOUT_S)


# ------------------------------------------------------------------------------------------- the routes

def complete_chat(body: ChatCompletionRequest) -> Any:
    """A chat completion (or its SSE stream) for the request's tenant: the API and the console's playground."""
    settings = context.settings()
    base, shorthand = parse_model(body.model, settings)
    max_tokens = body.max_completion_tokens or body.max_tokens or settings.max_new_tokens
    field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    if body.max_tokens and body.max_completion_tokens and body.max_tokens != body.max_completion_tokens:
        raise ApiError(422, "validation_error", "max_tokens and max_completion_tokens disagree", "max_tokens")
    if max_tokens > settings.max_new_tokens:
        raise ApiError(422, "validation_error", f"at most {settings.max_new_tokens} new tokens", field)
    eng = engine()
    resolved = resolve_steering(eng, body.steering, shorthand, body.user)
    prompt = eng.tokenize_chat([{"role": m.role, "content": m.text()} for m in body.messages])
    if len(prompt) >= eng.context_length:
        raise ApiError(422, "validation_error", f"the messages are {len(prompt)} tokens; the model's context is "
                       f"{eng.context_length} tokens", "messages")
    sampling = SamplingParams(max_tokens=max_tokens, temperature=float(body.temperature), top_p=float(body.top_p),
                              seed=body.seed, stop=body.stop_strings())
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        _record_exposure(resolved.applied, response_id)
    # Nothing below reads the database: end the transaction now, not after a long generation (an
    # experiment's first assignment would otherwise hold SQLite's write lock meanwhile).
    context.session().commit()
    handle = eng.submit(prompt, sampling, resolved.steering)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _events(handle, response_id, created, base, resolved.applied, include_usage)
        return Response(events, mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        result = handle.result(TOKEN_TIMEOUT_S)
    except (GenerationFailed, EngineStopped, TimeoutError) as exc:
        raise ApiError(500 if not isinstance(exc, EngineStopped) else 503, "generation_failed", str(exc)) from None
    finally:
        handle.cancel()  # no-op when finished
    _record_exposure(resolved.applied, response_id)
    return ChatCompletion(
        id=response_id, object="chat.completion", created=created, model=base,
        choices=[ChatChoice(index=0, message=ChatMessageOut(role="assistant", content=result.text),
                            finish_reason="length" if result.finish_reason == "length" else "stop")],
        usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                    total_tokens=result.prompt_tokens + result.completion_tokens),
        steering=resolved.applied)


@api_route(bp, "/v1/chat/completions", "POST", summary="chat completion under steering (OpenAI-compatible; "
           "`stream: true` answers server-sent events)", body=ChatCompletionRequest,
           responses={200: ChatCompletion}, errors=(404, 409, 503), tag="generation")
def chat_completions(body: ChatCompletionRequest) -> Any:
    return complete_chat(body)


def _record_exposure(applied: SteeringOut, response_id: str) -> None:
    if applied.experiment is None or applied.variant is None or applied.user is None:
        return
    from service import experiments

    experiments.record_exposure(context.session(), tenant_id(), applied.experiment, applied.variant,
                                applied.user, response_id)


def _events(handle: GenerationHandle, response_id: str, created: int, model: str, applied: SteeringOut,
            include_usage: bool) -> Iterator[str]:
    """The SSE stream. Runs after the view returned (no request context); when the client goes away the
    server closes this generator and `finally` frees the batch slot."""

    def event(choices: list[ChunkChoice], **extra: Any) -> str:
        chunk = ChatCompletionChunk(id=response_id, object="chat.completion.chunk", created=created, model=model,
                                    choices=choices, **extra)
        return f"data: {chunk.model_dump_json()}\n\n"

    try:
        yield event([ChunkChoice(index=0, delta=ChatDelta(role="assistant", content=""))], steering=applied)
        for chunk in handle.chunks(TOKEN_TIMEOUT_S):
            yield event([ChunkChoice(index=0, delta=ChatDelta(content=chunk.text))])
        result = handle.result(TOKEN_TIMEOUT_S)
        finish = "length" if result.finish_reason == "length" else "stop"
        yield event([ChunkChoice(index=0, delta=ChatDelta(), finish_reason=finish)])
        if include_usage:
            yield event([], usage=Usage(prompt_tokens=result.prompt_tokens,
                                        completion_tokens=result.completion_tokens,
                                        total_tokens=result.prompt_tokens + result.completion_tokens))
    except (GenerationFailed, EngineStopped, TimeoutError, SteerError) as exc:
        # Headers are gone: the error travels as an event, the way OpenAI streams report one.
        kind = "validation_error" if isinstance(exc, SteerError) else "generation_failed"
        yield f"data: {json.dumps({'error': {'type': kind, 'message': str(exc), 'field': None}})}\n\n"
    finally:
        handle.cancel()
    yield "data: [DONE]\n\n"


def _score_items(body: ScoreRequest) -> list[OpinionItem]:
    items = []
    for i, q in enumerate(body.questions):
        target = q.target
        if target is None and q.answer is None:
            target = [1.0 / len(q.options)] * len(q.options) if q.options else None  # unknown: uniform
        items.append(make_item(q.question, q.options, target=target, answer=q.answer, ordinal=q.ordinal,
                               id=None if q.id is None else str(q.id), field=f"questions[{i}]"))
    return items


def score_questions(body: ScoreRequest) -> ScoreResponse:
    """Answer distributions under steering for the request's tenant: the API and the console's playground."""
    settings = context.settings()
    base, shorthand = parse_model(body.model, settings)
    items = _score_items(body)
    eng = engine()
    for i, item in enumerate(items):
        if eng.score_prompt_tokens(item) >= eng.context_length:
            raise ApiError(422, "validation_error", f"the question's prompt is longer than the model's context "
                           f"({eng.context_length} tokens)", f"questions[{i}].question")
    resolved = resolve_steering(eng, body.steering, shorthand, body.user)
    rows = [resolved.steering] * len(items) if resolved.steering else None
    try:
        dists = eng.score(items, rows, timeout=TOKEN_TIMEOUT_S)
    except (EngineStopped, TimeoutError) as exc:
        raise ApiError(503, "unavailable", str(exc)) from None
    calibration = blend_calibration(applied_calibrations(resolved.applied)) if body.calibrated else IDENTITY
    dists = calibration.apply_all(items, dists)
    scores = [QuestionScore(id=item.id, probs=[float(x) for x in p], answer=int(np.argmax(p)),
                            expected_ordinal=float(np.dot(p, item.ordinal)))
              for item, p in zip(items, dists, strict=True)]
    known = all(q.target is not None or q.answer is not None for q in body.questions)
    return ScoreResponse(model=base, scores=scores, metrics=summarize(items, dists) if known else None,
                         steering=resolved.applied,
                         calibration=None if calibration.is_identity else CalibrationOut(**calibration.to_json()))


def applied_calibrations(applied: SteeringOut) -> list[tuple[Calibration, float]]:
    """Each applied profile's output calibration (recorded by its build) with its blend weight."""
    session, tenant = context.session(), tenant_id()
    parts = []
    for p in applied.profiles:
        row = db.get_profile(session, tenant, p.id)
        parts.append((recorded_calibration(row.metrics if row is not None else None), p.weight))
    return parts


@api_route(bp, "/v1/score", "POST", summary="answer distributions of multiple-choice questions under "
           "steering (the same reader as every metric)", body=ScoreRequest, responses={200: ScoreResponse},
           errors=(404, 409, 503), tag="generation")
def score(body: ScoreRequest) -> ScoreResponse:
    return score_questions(body)
