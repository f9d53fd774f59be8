"""Generation under steering: `POST /v1/chat/completions` (OpenAI-compatible, SSE streaming) and
`POST /v1/score` (answer distributions of multiple-choice questions).

Routes are thin: parse, turn the request's steering into a plain-data `SteeringPlan` (profiles checked
for tenant, status and model in the database; artifacts named by digest), hand it to the process's engine
through its `service.engine.client.EngineClient` (the engine starts with the first request that needs
it), and turn what comes back into JSON or an event stream. The engine's thread loads the profiles and
owns every tensor; nothing here imports torch. A client that goes away (streaming or not) cancels its row;
every request has a deadline.
"""

from __future__ import annotations

import json
import select
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from flask import Blueprint, Flask, Response, request

from service import context
from service.api.errors import ApiError, api_error, not_found
from service.api.openapi import api_route
from service.api.ratelimit import charge_tokens
from service.auth import tenant_id
from service.engine.client import (
    ENGINE,
    REQUEST_TIMEOUT_S,
    DeadlineExceeded,
    Engine,
    EngineClient,
    EngineUnavailable,
    GenerationHandle,
    GenerationResult,
    PlannedProfile,
    SamplingParams,
    Scored,
    SteeringPlan,
    TextChunk,
    TokenLogprob,
    calibrate_blend,
    engine_client,
)
from service.engine.client import (
    AppliedProfile as EngineApplied,
)
from service.protocol import (
    MAX_CHOICES,
    MAX_TOP_LOGPROBS,
    AppliedProfile,
    CalibrationOut,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatMessageOut,
    ChatTokenLogprob,
    ChoiceLogprobs,
    ChunkChoice,
    QuestionScore,
    ScoreRequest,
    ScoreResponse,
    SteeringIn,
    SteeringOut,
    TopLogprob,
    Usage,
)
from service.settings import Settings
from service.store import db
from steer_core.calibration import Calibration, recorded_calibration
from steer_core.data import OpinionItem, make_item
from steer_core.errors import SteerError
from steer_core.method_names import check_method_positions
from steer_core.metrics import summarize
from steer_core.option_orders import average_orders, in_both_orders, split_orders

bp = Blueprint("chat", __name__)

# How often a waiting request thread checks whether its client is still connected.
POLL_S = 0.05


# ------------------------------------------------------------------------------------------- the engine

def init_app(app: Flask) -> None:
    """Register the chat blueprint, the engine's client (nothing is loaded yet), its readiness probe and its
    metrics."""
    state = context.state(app)
    client = EngineClient(state.settings, profiles=lambda sha: state.profile_cache().load(sha),
                          served=lambda: app.config.get("GENERATION_MODEL"))
    app.extensions[ENGINE] = client
    state.model_probe = client.probe
    app.register_blueprint(bp)
    from service.observability import EXTENSION as METRICS

    metrics = app.extensions.get(METRICS)
    if metrics is not None:
        metrics.registry.register(client.collector())


def _unavailable(exc: EngineUnavailable) -> ApiError:
    """The engine's refusal as the 503 this blueprint (and the console's playground) answers with."""
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    return ApiError(503, "unavailable", str(exc), exc.field, headers=headers)


def engine(app: Flask | None = None) -> Engine:
    """The app's generation engine (started on first use)."""
    try:
        return engine_client(app).get()
    except EngineUnavailable as exc:
        raise _unavailable(exc) from None


def admitted(work: Callable[[], Any]) -> Any:
    """`work()` (which waits on the engine) in one of the process's engine-bound request slots
    (`EngineClient.admit`); a streamed response keeps its slot until the server closes it."""
    try:
        release = engine_client().admit()
    except EngineUnavailable as exc:
        raise _unavailable(exc) from None
    try:
        result = work()
    except BaseException:
        release()
        raise
    if isinstance(result, Response):
        result.call_on_close(release)
    else:
        release()
    return result


def stop_engine(app: Flask, timeout: float = 30.0) -> bool:
    """Stop the app's engine thread (tests, shutdown); a later request starts a new one unless the stop
    failed (False: the client is dead)."""
    client: EngineClient | None = app.extensions.get(ENGINE)
    return client.stop(timeout) if client is not None else True


# ------------------------------------------------------------------------------------------- steering

@dataclass
class Planned:
    """A request's steering as the engine takes it, and what the response reports about it."""

    plan: SteeringPlan | None
    applied: SteeringOut
    rows: list[tuple[db.ProfileRow, float]]

    def report(self, found: Sequence[EngineApplied]) -> SteeringOut:
        """The response's `steering`, with each profile's layer and strength as the engine found them."""
        self.applied.profiles = [
            AppliedProfile(id=row.id, weight=weight, version=row.version, method=row.method, layer=info.layer,
                           strength=info.strength)
            for (row, weight), info in zip(self.rows, found, strict=True)]
        return self.applied


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


def plan_steering(spec: SteeringIn | None, shorthand: str | None, user: str | None) -> Planned:
    """The request's blend as a plan, each profile checked for this tenant, status and model."""
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
        from service.experiments import experiments

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
    rows: list[tuple[db.ProfileRow, float]] = []
    entries: list[PlannedProfile] = []
    for ref in refs:
        row = _ready_profile(session, tenant, settings, ref)
        if positions is not None:
            try:
                check_method_positions(positions, row.method)
            except SteerError as exc:
                raise ApiError(422, "validation_error", exc.message, "steering.positions") from None
        assert row.artifact_sha256 is not None
        entries.append(PlannedProfile(digest=row.artifact_sha256, weight=ref.weight, positions=positions,
                                      field=ref.field, name=f"profile {row.id}"))
        rows.append((row, ref.weight))
    return Planned(plan=SteeringPlan(tuple(entries)) if entries else None, applied=out, rows=rows)


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


# ------------------------------------------------------------------------------------------- the routes

def complete_chat(body: ChatCompletionRequest) -> Any:
    """A chat completion (or its SSE stream) for the request's tenant: the API and the console's playground.

    Each of the `n` choices is one engine row (the prompt is prefilled for each; the rows batch together).
    """
    settings = context.settings()
    base, shorthand = parse_model(body.model, settings)
    max_tokens = body.max_completion_tokens or body.max_tokens or min(settings.default_max_tokens,
                                                                      settings.max_new_tokens)
    field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    if body.max_tokens and body.max_completion_tokens and body.max_tokens != body.max_completion_tokens:
        raise ApiError(422, "validation_error", "max_tokens and max_completion_tokens disagree", "max_tokens")
    if max_tokens > settings.max_new_tokens:
        raise ApiError(422, "validation_error", f"at most {settings.max_new_tokens} new tokens", field)
    return admitted(lambda: _complete_chat(body, base, shorthand, max_tokens))


def _complete_chat(body: ChatCompletionRequest, base: str, shorthand: str | None, max_tokens: int) -> Any:
    eng = engine()
    planned = plan_steering(body.steering, shorthand, body.user)
    prompt = eng.tokenize_chat([{"role": m.role, "content": m.text()} for m in body.messages])
    if len(prompt) >= eng.context_length:
        raise ApiError(422, "validation_error", f"the messages are {len(prompt)} tokens; the model's context is "
                       f"{eng.context_length} tokens", "messages")
    charge_tokens(tenant_id(), body.n * (len(prompt) + max_tokens))  # the tenant's per-minute token budget
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    samplings = [SamplingParams(max_tokens=max_tokens, temperature=float(body.temperature), top_p=float(body.top_p),
                                seed=None if body.seed is None else body.seed + i, stop=body.stop_strings(),
                                top_logprobs=top_logprobs)
                 for i in range(body.n)]
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    model = body.model or base  # echoed as sent: `<base>:<profile id>` keeps its profile id
    # Nothing below reads the database until the engine answers: end the transaction now, not after a long
    # wait (an experiment's first assignment would otherwise hold SQLite's write lock meanwhile).
    context.session().commit()
    gone = client_gone_check()
    handles = _submit(eng, prompt, samplings, planned.plan)
    try:
        applied = planned.report(_started(handles, gone))
    except BaseException:
        _cancel(handles)
        raise
    if body.stream:
        _record_exposure(applied, response_id)
        context.session().commit()
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _events(eng, handles, gone, response_id, created, model, applied, include_usage,
                         logprobs=top_logprobs is not None)
        return Response(events, mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        results = {i: item for i, item in _outputs(handles, gone) if isinstance(item, GenerationResult)}
    finally:
        _cancel(handles)  # no-op when finished
    _record_exposure(applied, response_id)
    return ChatCompletion(
        id=response_id, object="chat.completion", created=created, model=model,
        choices=[ChatChoice(index=i, message=ChatMessageOut(role="assistant", content=result.text),
                            finish_reason=_finish_reason(result),
                            logprobs=None if result.logprobs is None else _wire_logprobs(eng, result.logprobs))
                 for i, result in sorted(results.items())],
        usage=_usage(list(results.values())), steering=applied)


def _submit(eng: Engine, prompt: list[int], samplings: Sequence[SamplingParams],
            plan: SteeringPlan | None) -> list[GenerationHandle]:
    """One engine row per choice; a full queue refuses the request whole."""
    handles: list[GenerationHandle] = []
    try:
        for sampling in samplings:
            handles.append(eng.submit(prompt, sampling, plan, timeout=REQUEST_TIMEOUT_S))
    except BaseException:
        _cancel(handles)
        raise
    return handles


def _cancel(handles: Sequence[GenerationHandle]) -> None:
    for handle in handles:
        handle.cancel()


def _finish_reason(result: GenerationResult) -> Literal["stop", "length"]:
    return "length" if result.finish_reason == "length" else "stop"


def _usage(results: Sequence[GenerationResult]) -> Usage:
    """The prompt once (OpenAI's count), and every choice's tokens."""
    completion = sum(r.completion_tokens for r in results)
    return Usage(prompt_tokens=results[0].prompt_tokens, completion_tokens=completion,
                 total_tokens=results[0].prompt_tokens + completion)


def _wire_logprobs(eng: Engine, entries: Sequence[TokenLogprob]) -> ChoiceLogprobs:
    """OpenAI's form of the engine's log-probabilities: each token's text and UTF-8 bytes."""
    tokens = list({t for e in entries for t in (e.token, *(t for t, _ in e.top))})
    spelled = dict(zip(tokens, eng.token_bytes(tokens), strict=True))

    def token(t: int, logprob: float) -> dict[str, Any]:
        raw = spelled[t]
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return ChoiceLogprobs(content=[
        ChatTokenLogprob(**token(e.token, e.logprob), top_logprobs=[TopLogprob(**token(t, v)) for t, v in e.top])
        for e in entries])


class ClientGone(ApiError):
    """The client closed its connection; its request was cancelled (nobody reads this answer)."""

    def __init__(self) -> None:
        super().__init__(499, "client_closed_request", "the client closed the connection")


def client_gone_check() -> Callable[[], bool]:
    """A check, usable after the view returned, of whether this request's client closed its connection.

    Reads the connection the WSGI server exposes (gunicorn's and werkzeug's): a socket that is readable
    and yields no byte was closed by the peer. Where the server exposes none, the check says "connected".
    """
    sock = request.environ.get("gunicorn.socket") or request.environ.get("werkzeug.socket")
    if not isinstance(sock, socket.socket):
        return lambda: False

    def gone() -> bool:
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                return False
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except (OSError, ValueError):  # closed or reset
            return True

    return gone


def _started(handles: Sequence[GenerationHandle], gone: Callable[[], bool]) -> tuple[EngineApplied, ...]:
    """What the engine applied (the same plan for every choice), once it took every row (raises what it
    refused one with)."""
    applied: tuple[EngineApplied, ...] = ()
    for handle in handles:
        while (started := handle.started(POLL_S)) is None:
            _check_waiting(handles, gone)
        applied = started
    return applied


def _check_waiting(handles: Sequence[GenerationHandle], gone: Callable[[], bool]) -> None:
    if gone():
        _cancel(handles)
        raise ClientGone()
    if time.monotonic() > max(h.deadline for h in handles) + POLL_S * 20:  # the engine drops rows itself
        _cancel(handles)
        raise DeadlineExceeded("the request did not finish before its deadline")


def _outputs(handles: Sequence[GenerationHandle],
             gone: Callable[[], bool]) -> Iterator[tuple[int, TextChunk | GenerationResult]]:
    """Each choice's text chunks and then its result, as (choice index, item), as they come.

    Waits on the first unfinished choice and takes what the others have meanwhile: the rows of one
    request step together, so none waits long behind another.
    """
    pending = list(range(len(handles)))
    checked = time.monotonic()
    while pending:
        first = pending[0]
        waited = handles[first].next(POLL_S)
        # Every POLL_S whether tokens flow or not: a client that gives up mid-answer frees its row.
        if waited is None or time.monotonic() - checked >= POLL_S:
            _check_waiting(handles, gone)
            checked = time.monotonic()
        for i in list(pending):
            item = waited if i == first else handles[i].next(0)
            while item is not None:
                yield i, item
                if isinstance(item, GenerationResult):
                    pending.remove(i)
                    break
                item = handles[i].next(0)


@api_route(bp, "/v1/chat/completions", "POST", summary="chat completion under steering (OpenAI-compatible; "
           f"`stream: true` answers server-sent events; `logprobs`, `top_logprobs` up to {MAX_TOP_LOGPROBS}, "
           f"`n` up to {MAX_CHOICES})",
           body=ChatCompletionRequest, responses={200: ChatCompletion}, errors=(404, 409, 503), tag="generation")
def chat_completions(body: ChatCompletionRequest) -> Any:
    return complete_chat(body)


def _record_exposure(applied: SteeringOut, response_id: str) -> None:
    if applied.experiment is None or applied.variant is None or applied.user is None:
        return
    from service.experiments import experiments

    experiments.record_exposure(context.session(), tenant_id(), applied.experiment, applied.variant,
                                applied.user, response_id)


def _events(eng: Engine, handles: Sequence[GenerationHandle], gone: Callable[[], bool],
            response_id: str, created: int, model: str, applied: SteeringOut, include_usage: bool,
            logprobs: bool) -> Iterator[str]:
    """The SSE stream. Runs after the view returned (no request context). A client that goes away
    cancels the rows at once (checked before each write and while waiting); `finally` frees the slots."""

    def event(choices: list[ChunkChoice], **extra: Any) -> str:
        chunk = ChatCompletionChunk(id=response_id, object="chat.completion.chunk", created=created, model=model,
                                    choices=choices, **extra)
        return f"data: {chunk.model_dump_json()}\n\n"

    try:
        yield event([ChunkChoice(index=i, delta=ChatDelta(role="assistant", content="")) for i in range(len(handles))],
                    steering=applied)
        results: list[GenerationResult] = []
        for i, item in _outputs(handles, gone):
            if gone():
                _cancel(handles)
                return
            if isinstance(item, TextChunk):
                yield event([ChunkChoice(index=i, delta=ChatDelta(content=item.text),
                                         logprobs=_wire_logprobs(eng, item.logprobs) if logprobs else None)])
                continue
            results.append(item)
            yield event([ChunkChoice(index=i, delta=ChatDelta(), finish_reason=_finish_reason(item))])
        if include_usage:
            yield event([], usage=_usage(results))
    except ClientGone:
        return
    except Exception as exc:
        # Headers are gone: the error travels as an event, the way OpenAI streams report one.
        yield f"data: {json.dumps({'error': api_error(exc).body()})}\n\n"
    finally:
        _cancel(handles)
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
    base, shorthand = parse_model(body.model, context.settings())
    items = _score_items(body)
    return admitted(lambda: _score(body, base, shorthand, items))


def _score(body: ScoreRequest, base: str, shorthand: str | None, items: list[OpinionItem]) -> ScoreResponse:
    eng = engine()
    for i, item in enumerate(items):
        if eng.score_prompt_tokens(item) >= eng.context_length:
            raise ApiError(422, "validation_error", f"the question's prompt is longer than the model's context "
                           f"({eng.context_length} tokens)", f"questions[{i}].question")
    planned = plan_steering(body.steering, shorthand, body.user)
    context.session().commit()
    # Debiased by default: every question also read with its options reversed, in the same request (so in the
    # same engine batches), both mapped back to the order given and averaged.
    asked = in_both_orders(items) if body.orders == 2 else items
    scored = eng.score(asked, planned.plan, timeout=REQUEST_TIMEOUT_S)
    distributions, leans = _merge_orders(scored, len(items)) if body.orders == 2 else (scored.distributions,
                                                                                       scored.leans)
    steering = planned.report(scored.applied[0] if scored.applied else ())
    # The profiles' recorded calibrations, pooled; a profile with a question lean read each question's own
    # lean off its prompt, which replaces that profile's recorded lean in the blend, question by question.
    blend = calibrate_blend(items, distributions, leans, applied_calibrations(steering) if body.calibrated else [])
    per_question, calibration = blend.per_question, blend.calibration
    scores = [QuestionScore(id=item.id, probs=[float(x) for x in p], answer=int(np.argmax(p)),
                            expected_ordinal=float(np.dot(p, item.ordinal)),
                            lean=c.lean if per_question else None)
              for item, p, c in zip(items, blend.distributions, blend.calibrations, strict=True)]
    known = all(q.target is not None or q.answer is not None for q in body.questions)
    return ScoreResponse(model=base, scores=scores,
                         metrics=summarize(items, blend.distributions) if known else None, steering=steering,
                         calibration=None if calibration.is_identity and not per_question else
                         CalibrationOut(**calibration.to_json(), lean_per_question=per_question))


def _merge_orders(scored: Scored, n: int) -> tuple[list[np.ndarray], list[tuple[float | None, ...]]]:
    """Reads of `in_both_orders(items)` as one per item: the distributions averaged in the items' option order,
    and each profile's question lean averaged over the two prompts (the lean of their mean state: the probe is
    linear, up to its clip at the largest lean)."""
    distributions = average_orders(split_orders(scored.distributions, n))
    leans = [tuple(None if a is None or b is None else 0.5 * (a + b) for a, b in zip(first, second, strict=True))
             for first, second in zip(scored.leans[:n], scored.leans[n:], strict=True)]
    return distributions, leans


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
