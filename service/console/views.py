"""The console's pages. Each page calls the same service functions as the API route that does the same
thing; the session (see `sessions.py`) scopes it to its tenant exactly as a key scopes the API."""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, Response, g, jsonify, redirect, render_template, request, url_for
from pydantic import ValidationError
from sqlalchemy import func, select
from werkzeug.wrappers import Response as BaseResponse

from service import context
from service.api import chat, opinions, populations, profiles
from service.api.errors import ApiError, api_error, field_path, not_found
from service.api.experiments import offline_result
from service.api.openapi import parse_body
from service.api.subjects import find_subject
from service.auth import active_key, tenant_id
from service.console import sessions
from service.console.item_plot import item_plot
from service.experiments import experiments as ex
from service.experiments import offline_comparison
from service.experiments.errors import ExperimentError
from service.protocol import (
    ChatCompletionRequest,
    ExperimentCreate,
    OpinionsPost,
    PopulationCreate,
    ProfileCreate,
    ScoreRequest,
)
from service.store import db
from steer_core.calibration import recorded_calibration
from steer_core.errors import SteerError
from steer_core.method_names import METHOD_NAMES, POPULATION_METHOD

bp = Blueprint("console", __name__, url_prefix="/console", template_folder="templates", static_folder="static")

ITEMS_PER_PAGE = 20
PROFILES_SHOWN = 200
QUESTIONS_SHOWN = 20  # a population's suggested questions: about what a new user is asked
FINAL_STATUSES = ("ready", "failed")


# ------------------------------------------------------------------------------------------ errors

@bp.errorhandler(ApiError)
def _api_error(exc: ApiError) -> tuple[str, int, dict[str, str]]:
    return _error_page(exc.status, exc.message, exc.field), exc.status, exc.headers


@bp.errorhandler(ExperimentError)
def _experiment_error(exc: ExperimentError) -> tuple[str, int, dict[str, str]]:
    return _api_error(api_error(exc))  # the status the API gives it


@bp.errorhandler(SteerError)
def _steer_error(exc: SteerError) -> tuple[str, int]:
    return _error_page(422, exc.message, exc.field), 422


@bp.errorhandler(ValidationError)
def _validation_error(exc: ValidationError) -> tuple[str, int]:
    first = exc.errors(include_url=False)[0]
    return _error_page(422, first.get("msg", "invalid value"), field_path(first.get("loc", ()))), 422


def _error_page(status: int, message: str, field: str | None) -> Any:
    if _wants_json():
        return jsonify({"error": {"status": status, "message": message, "field": field}})
    return render_template("console/error.html", status=status, message=message, field=field)


def _wants_json() -> bool:
    return request.is_json or request.headers.get("Accept", "").startswith("application/json")


# Scripts only from the console's own file; no framing (its buttons delete and stop things).
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


@bp.after_request
def _security_headers(response: BaseResponse) -> BaseResponse:
    for name, value in _SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if response.mimetype == "text/html":
        response.headers["Cache-Control"] = "no-store"  # pages hold tenant data and the CSRF token
    return response


@bp.context_processor
def _globals() -> dict[str, Any]:
    return {"csrf_token": g.get("console_csrf"), "csrf_field": sessions.CSRF_FIELD, "fmt": _fmt,
            "signed_in": g.get("console_csrf") is not None}


def _fmt(x: Any, digits: int = 3) -> str:
    """A value as the pages print it: numbers to `digits` places, yes/no for booleans, mappings and lists in
    words (`_readable`), never Python's or JSON's spelling."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, dict | list | tuple):
        return _readable(x)
    if not isinstance(x, int | float):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _readable(value: Any, limit: int = 300) -> str:
    """A mapping or list as words: `layer 3, strength 1.500, kernel unit`; nested ones in parentheses; cut at
    `limit` characters."""
    if isinstance(value, dict):
        parts = [f"{str(k).replace('_', ' ')} {_nested(v)}" for k, v in value.items() if v is not None]
        text = ", ".join(parts) or "none"
    elif isinstance(value, list | tuple):
        text = ", ".join(_nested(v) for v in value) or "none"
    else:
        text = _fmt(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _nested(value: Any) -> str:
    return f"({_readable(value)})" if isinstance(value, dict) and len(value) > 1 else _fmt(value)


# ------------------------------------------------------------------------------------------ sign-in

def _safe_next(target: str | None) -> str:
    """Only a path inside the console (no open redirect)."""
    if target and target.startswith("/console") and not urlsplit(target).netloc and "\\" not in target:
        return target
    return url_for("console.profile_list")


@bp.get("/")
def index() -> BaseResponse:
    return redirect(url_for("console.profile_list"))


@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    error = None
    status = 200
    if request.method == "POST":
        if not sessions.csrf_matches(request.cookies.get(sessions.LOGIN_COOKIE, ""), request.form.get("csrf_token")):
            raise ApiError(403, "csrf_failed", "the sign-in form expired or was not sent from this site; reload "
                           "the page", "csrf_token")
        key = active_key(context.session(), request.form.get("api_key", "").strip())
        if key is not None:
            sessions.close_session(request.cookies.get(sessions.SESSION_COOKIE))  # one session per sign-in
            token, _ = sessions.open_session(key)
            context.session().commit()
            response = redirect(_safe_next(request.form.get("next")))
            sessions.set_cookie(response, sessions.SESSION_COOKIE, token, context.settings().console_session_ttl)
            sessions.clear_cookie(response, sessions.LOGIN_COOKIE)
            return response
        error, status = "unknown or revoked API key", 401
    import secrets

    login_token = secrets.token_urlsafe(32)
    page = render_template("console/login.html", login_token=login_token, error=error,
                           next=request.values.get("next", ""))
    response = Response(page, status=status)
    sessions.set_cookie(response, sessions.LOGIN_COOKIE, login_token, sessions.LOGIN_TTL_S)
    return response


@bp.post("/logout")
@sessions.signed_in
def logout() -> BaseResponse:
    sessions.close_session(request.cookies.get(sessions.SESSION_COOKIE))
    response = redirect(url_for("console.login"))
    sessions.clear_cookie(response, sessions.SESSION_COOKIE)
    return response


# ------------------------------------------------------------------------------------------ profiles

def _profile_row(profile_id: str) -> db.ProfileRow:
    row = db.get_profile(context.session(), tenant_id(), profile_id)
    if row is None:
        raise not_found(f"profile {profile_id!r}", "id")
    return row


def _progress_label(view: Any) -> str:
    if view.status == "building" and view.progress is not None:
        p = view.progress
        return f"building {p.done}/{p.total}" + (f" ({p.stage})" if p.stage else "")
    return view.status


@bp.get("/profiles")
@sessions.signed_in
def profile_list() -> str:
    session = context.session()
    rows = db.list_profiles(session, tenant_id(), limit=PROFILES_SHOWN)
    views = profiles.profile_views(session, rows, per_item=False)
    return render_template("console/profiles.html", profiles=views, label=_progress_label, final=FINAL_STATUSES)


@bp.get("/profiles/<profile_id>")
@sessions.signed_in
def profile_page(profile_id: str) -> str:
    row = _profile_row(profile_id)
    view = profiles.profile_views(context.session(), [row])[0]
    tables = _metric_tables(view.metrics or {})
    return render_template("console/profile.html", p=view, label=_progress_label(view), final=FINAL_STATUSES,
                           tables=tables, facts=_metric_facts(view.metrics or {}), bars=_alignment_bars(tables),
                           plot=item_plot(view.metrics or {}), calibration=_calibration(row),
                           params=_readable(view.params) if view.params else "none: the build chose everything",
                           downloads=_downloads(row))


def _downloads(row: db.ProfileRow) -> list[tuple[str, str]]:
    """(format, label) of each download this profile has: none until it is ready; a GGUF control vector only
    for a constant-vector profile past block 0 (DiffMean, a population fit, COLD-Steer's unit kernel); a peft
    adapter only for a LoRA profile and COLD-Steer's finite-difference one (`service.engine.tools`)."""
    if row.status != "ready" or row.artifact_sha256 is None:
        return []
    found = [("safetensors", "Download safetensors")]
    params = row.params if isinstance(row.params, dict) else {}
    chosen = row.chosen if isinstance(row.chosen, dict) else {}
    layer = chosen.get("layer", params.get("layer"))
    constant = row.method in ("diffmean", POPULATION_METHOD) or (
        row.method == "cold_kernel" and chosen.get("kernel", params.get("kernel", "unit")) == "unit")
    if constant and isinstance(layer, int) and layer >= 1:
        found.append(("gguf", "Download GGUF control vector"))
    if row.method in ("lora", "cold_fd"):
        found.append(("peft", "Download peft adapter"))
    return found


# The alignment bars start below the lowest value shown, so that differences of a few thousandths show; the
# axis is labelled with where it starts.
BAR_MARGIN = 0.5  # of the spread between the highest and the lowest value, below and above them


def _alignment_bars(tables: list[tuple[str, list[str], list[tuple[str, dict[str, Any]]]]]) -> dict[str, Any] | None:
    """The first score table's alignment per model as bars on a scale from a little below the lowest to a little
    above the highest (rounded to hundredths; inside 0 to 1), or None without alignments."""
    if not tables or "alignment" not in tables[0][1]:
        return None
    rows = [(name, float(v["alignment"])) for name, v in tables[0][2] if _is_number(v.get("alignment"))]
    if not rows:
        return None
    low, high = min(v for _, v in rows), max(v for _, v in rows)
    margin = max(BAR_MARGIN * (high - low), 0.01)
    start = max(0.0, math.floor((low - margin) * 100) / 100)
    end = min(1.0, math.ceil((high + margin) * 100) / 100) if high <= 1.0 else math.ceil(high * 100) / 100
    if end <= start:
        end = start + 0.01
    return {"start": start, "end": end,
            "rows": [(name, value, round(100 * (value - start) / (end - start), 1)) for name, value in rows]}


def _calibration(row: db.ProfileRow) -> str | None:
    """The output calibration the profile carries, as its build recorded it in the profile's metrics (what
    `/v1/score` applies): `calibration`, and `question_lean` when one shipped. The artifact is not read."""
    if row.status != "ready" or row.artifact_sha256 is None:
        return None
    metrics = row.metrics if isinstance(row.metrics, dict) else {}
    try:
        calibration = recorded_calibration(metrics)
    except SteerError as exc:
        return f"unavailable: {exc.message}"
    lean = metrics.get("question_lean")
    if isinstance(lean, dict) and lean.get("shipped") and lean.get("layer") is not None:
        return f"temperature {_fmt(calibration.temperature)}, lean read off each question (block {lean['layer']})"
    if calibration.is_identity:
        return "none (the identity)"
    return ", ".join(f"{k} {_fmt(float(v))}" for k, v in calibration.to_json().items())


@bp.get("/profiles/<profile_id>/status")
@sessions.signed_in
def profile_status(profile_id: str) -> BaseResponse:
    view = profiles.profile_views(context.session(), [_profile_row(profile_id)])[0]
    return jsonify({"status": view.status, "label": _progress_label(view), "final": view.status in FINAL_STATUSES})


@bp.get("/profiles/statuses")
@sessions.signed_in
def profile_statuses() -> BaseResponse:
    """The status of each profile named in `ids` (comma-separated; the list page polls them in one request)."""
    ids = [i for i in request.args.get("ids", "").split(",") if i][:PROFILES_SHOWN]
    session = context.session()
    rows = [r for r in (db.get_profile(session, tenant_id(), i) for i in ids) if r is not None]
    return jsonify({v.id: {"status": v.status, "label": _progress_label(v), "final": v.status in FINAL_STATUSES}
                    for v in profiles.profile_views(session, rows, per_item=False)})


@bp.get("/profiles/<profile_id>/download")
@sessions.signed_in
def profile_download(profile_id: str) -> BaseResponse:
    fmt = request.args.get("format", "safetensors")
    if fmt not in ("safetensors", "gguf", "peft"):
        raise ApiError(422, "validation_error", "format is safetensors, gguf or peft", "format")
    return profiles.artifact_download(profile_id, fmt)


@bp.post("/profiles/<profile_id>/delete")
@sessions.signed_in
def profile_delete(profile_id: str) -> BaseResponse:
    profiles.remove_profile(profile_id)
    return redirect(url_for("console.profile_list"))


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _metric_tables(metrics: dict[str, Any]) -> list[tuple[str, list[str], list[tuple[str, dict[str, Any]]]]]:
    """Every group of named scores in the profile's metrics as a table: rows are the models compared
    (unsteered, steered, baselines...), columns the metrics. Whatever the build recorded is shown."""
    tables = []
    rows = [(name, value) for name, value in metrics.items()
            if isinstance(value, dict) and value and "standard_error" not in value
            and all(_is_number(v) for v in value.values())]
    if rows:
        columns = list(dict.fromkeys(k for _, v in rows for k in v))
        tables.append(("scores", columns, rows))
    for name, value in metrics.items():  # nested groups, e.g. {"baselines": {"uniform": {...}, ...}}
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            inner = [(k, v) for k, v in value.items() if all(_is_number(x) for x in v.values())]
            if inner:
                columns = list(dict.fromkeys(k for _, v in inner for k in v))
                tables.append((name, columns, inner))
    return tables


def _metric_facts(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """The metrics' other entries as (name, text); a value with a standard error reads `x ± se`."""
    facts = []
    for name, value in metrics.items():
        if value is None or name in ("search", "per_item"):  # each has its own table or plot
            continue
        if _is_number(value) or isinstance(value, str | bool):
            facts.append((name, _fmt(value)))
        elif isinstance(value, dict) and not all(isinstance(v, dict) for v in value.values()) \
                and not all(_is_number(v) for v in value.values()):
            facts.append((name, _with_errors(value)))
        elif isinstance(value, dict) and "standard_error" in value:
            facts.append((name, _with_errors(value)))
        elif isinstance(value, list):
            facts.append((name, _readable(value)))
    return facts


def _with_errors(value: dict[str, Any]) -> str:
    se = value.get("standard_error")
    parts = []
    for k, v in value.items():
        if k == "standard_error":
            continue
        text = _fmt(v) if not isinstance(v, dict | list) else _readable(v, 200)
        if se is not None and _is_number(v) and _is_number(se):
            text += f" ± {_fmt(se)}"
        parts.append(f"{str(k).replace('_', ' ')}: {text}")
    return "; ".join(parts)


# ------------------------------------------------------------------------------------ groups and users

@bp.get("/subjects")
@sessions.signed_in
def subject_list() -> str:
    """Groups and users, each list paged (`gpage`, `page`; SUBJECTS_PER_PAGE a page) and both narrowed by `q`
    (a part of the id, any case)."""
    session = context.session()
    tenant = tenant_id()
    q = request.args.get("q", "").strip()[:200]
    groups = _subject_page(session, db.Group, db.Group.gid, db.OpinionRow.group_id, tenant, q,
                           request.args.get("gpage", 1, type=int))
    users = _subject_page(session, db.User, db.User.uid, db.OpinionRow.user_id, tenant, q,
                          request.args.get("page", 1, type=int))
    return render_template("console/subjects.html", q=q, groups=groups, users=users)


SUBJECTS_PER_PAGE = 50


def _subject_page(session: Any, model: Any, name: Any, opinion_column: Any, tenant: int, q: str,
                  page: int | None) -> dict[str, Any]:
    """One page of a tenant's groups or users whose id contains `q`: `rows` as (id, own items), `page`,
    `pages` and `total`."""
    query = select(model).where(model.tenant_id == tenant)
    if q:
        escaped = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = query.where(name.ilike(f"%{escaped}%", escape="\\"))
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    pages = max(1, math.ceil(total / SUBJECTS_PER_PAGE))
    page = min(max(1, page or 1), pages)
    rows = session.scalars(query.order_by(name).limit(SUBJECTS_PER_PAGE)
                           .offset((page - 1) * SUBJECTS_PER_PAGE)).all()
    counts = dict(session.execute(select(opinion_column, func.count()).where(
        db.OpinionRow.tenant_id == tenant, opinion_column.in_([r.id for r in rows])).group_by(opinion_column)).all())
    return {"rows": [(getattr(r, name.key), counts.get(r.id, 0)) for r in rows], "page": page, "pages": pages,
            "total": total}


def _check_kind(kind: str) -> str:
    if kind not in ("group", "user"):
        raise not_found(f"{kind!r} pages", "kind")
    return kind


@bp.get("/subjects/<kind>/<subject_id>")
@sessions.signed_in
def subject_page(kind: str, subject_id: str) -> str:
    _check_kind(kind)
    session = context.session()
    tenant = tenant_id()
    subject = find_subject(session, tenant, kind, subject_id, "id")
    items = [r.to_item() for r in db.own_opinions(session, tenant, kind, subject.id)]
    page = max(1, request.args.get("page", 1, type=int) or 1)
    pages = max(1, math.ceil(len(items) / ITEMS_PER_PAGE))
    page = min(page, pages)
    shown = items[(page - 1) * ITEMS_PER_PAGE: page * ITEMS_PER_PAGE]
    built = profiles.profile_views(session, db.list_profiles(session, tenant, kind=kind, subject_id=subject.id,
                                                             limit=50), per_item=False)
    return render_template("console/subject.html", kind=kind, subject_id=subject_id, items=shown, page=page,
                           pages=pages, total=len(items), profiles=built, methods=list(METHOD_NAMES),
                           label=_progress_label)


@bp.post("/subjects/<kind>/<subject_id>/opinions")
@sessions.signed_in
def subject_upload(kind: str, subject_id: str) -> BaseResponse:
    """A JSONL file of items (the interchange format; gzip-compressed where its name ends in .gz), read a line
    at a time by the uploads' reader and held to their limits (`steer_core.tables.jsonl_objects`; errors name
    `items[row]`), stored all or nothing by the API's function, which validates every item's text."""
    from service.api.openapi import check_json_value
    from service.protocol import MAX_ITEMS_PER_REQUEST
    from steer_core.tables import ReadLimits, jsonl_objects

    _check_kind(kind)
    upload = request.files.get("items")
    if upload is None or not upload.filename:
        raise ApiError(422, "validation_error", "choose a JSONL file of opinion items", "items")
    compression = "gzip" if upload.filename.lower().endswith(".gz") else None
    limits = ReadLimits(rows=MAX_ITEMS_PER_REQUEST, expanded_bytes=context.settings().max_upload_expanded_bytes)
    raw: list[Any] = [obj for _, _, obj in jsonl_objects(upload.stream, compression=compression, limits=limits,
                                                         name="items", declare="upload it uncompressed, or with "
                                                                               "a name that ends in .gz")]
    check_json_value({"items": raw})  # the bounds every JSON body is held to (numbers, nesting, text)
    body = OpinionsPost.model_validate({"items": raw})
    opinions.post_opinions(kind, subject_id, body)
    return redirect(url_for("console.subject_page", kind=kind, subject_id=subject_id))


@bp.post("/subjects/<kind>/<subject_id>/build")
@sessions.signed_in
def subject_build(kind: str, subject_id: str) -> BaseResponse:
    _check_kind(kind)
    params: dict[str, Any] = {}
    for name, cast in (("layer", int), ("strength", float)):
        text = request.form.get(name, "").strip()
        if text:
            try:
                params[name] = cast(text)
            except ValueError:
                raise ApiError(422, "validation_error", f"{name} must be a number", f"params.{name}") from None
    body = ProfileCreate.model_validate({"subject": {"kind": kind, "id": subject_id},
                                         "method": request.form.get("method", ""), "params": params})
    view, _, _ = profiles.request_build(body)
    return redirect(url_for("console.profile_page", profile_id=view.id))


# ------------------------------------------------------------------------------------------ populations

@bp.get("/populations")
@sessions.signed_in
def population_list() -> str:
    views = populations.tenant_populations()
    return render_template("console/populations.html", populations=views, final=FINAL_STATUSES)


@bp.post("/populations")
@sessions.signed_in
def population_create() -> BaseResponse:
    body = PopulationCreate.model_validate({"name": request.form.get("name", "").strip()})
    view = populations.request_population(body)
    return redirect(url_for("console.population_page", population_id=view.id))


@bp.get("/populations/<population_id>")
@sessions.signed_in
def population_page(population_id: str) -> str:
    view = populations.population_out(populations.find_population(population_id))
    questions = populations.next_questions(population_id, QUESTIONS_SHOWN) if view.status == "ready" else []
    return render_template("console/population.html", p=view, questions=questions, final=FINAL_STATUSES)


@bp.post("/populations/<population_id>/fit")
@sessions.signed_in
def population_fit(population_id: str) -> BaseResponse:
    """Fit a user or group against the population: an ordinary profile request (method `population`)."""
    kind = _check_kind(request.form.get("kind", ""))
    body = ProfileCreate.model_validate({"subject": {"kind": kind, "id": request.form.get("id", "").strip()},
                                         "method": POPULATION_METHOD, "params": {"population": population_id}})
    view, _, _ = profiles.request_build(body)
    return redirect(url_for("console.profile_page", profile_id=view.id))


# ------------------------------------------------------------------------------------------ experiments

def _experiment(experiment_id: str) -> db.Experiment:
    return ex.require_experiment(context.session(), tenant_id(), experiment_id)


def _ready_profiles() -> list[Any]:
    session = context.session()
    rows = db.list_profiles(session, tenant_id(), status="ready", limit=PROFILES_SHOWN)
    return profiles.profile_views(session, [r for r in rows if r.model == context.settings().model], per_item=False)


@bp.get("/experiments")
@sessions.signed_in
def experiment_list() -> str:
    session = context.session()
    rows = ex.list_experiments(session, tenant_id(), PROFILES_SHOWN, None)
    groups = session.scalars(select(db.Group.gid).where(db.Group.tenant_id == tenant_id())
                             .order_by(db.Group.gid)).all()
    return render_template("console/experiments.html", experiments=[ex.experiment_view(session, e) for e in rows],
                           ready=_ready_profiles(), groups=groups)


@bp.post("/experiments")
@sessions.signed_in
def experiment_create() -> BaseResponse:
    """Variants from the form: `variant_name_N`, `variant_profile_N` (empty: unsteered), `variant_weight_N`."""
    form = request.form
    variants = []
    for n in range(1, 5):
        name = form.get(f"variant_name_{n}", "").strip()
        if not name:
            continue
        profile = form.get(f"variant_profile_{n}", "").strip()
        weight = form.get(f"variant_weight_{n}", "1").strip() or "1"
        try:
            traffic = float(weight)
        except ValueError:
            raise ApiError(422, "validation_error", "traffic weights are numbers", f"variants[{n - 1}].weight") \
                from None
        variants.append({"name": name, "weight": traffic, "profiles": [{"id": profile}] if profile else []})
    payload: dict[str, Any] = {"name": form.get("name", "").strip(), "variants": variants,
                               "reward": form.get("reward", "thumbs")}
    if form.get("scope", "").strip():
        payload["scope"] = {"group": form["scope"].strip()}
    body = ExperimentCreate.model_validate(payload)
    settings = context.settings()
    exp = ex.create_experiment(context.session(), tenant_id(), body, model=settings.model,
                               max_profiles=settings.max_profiles_per_request)
    return redirect(url_for("console.experiment_page", experiment_id=exp.id))


@bp.get("/experiments/<experiment_id>")
@sessions.signed_in
def experiment_page(experiment_id: str) -> str:
    session = context.session()
    exp = _experiment(experiment_id)
    offline, can_ask = _stored_offline(exp)
    if can_ask and request.args.get("offline") == "1":  # ask a worker for it (once for the same inputs)
        offline = offline_result(exp)
    results = ex.experiment_results(session, exp, offline)
    view = ex.experiment_view(session, exp)
    return render_template("console/experiment.html", e=view, r=results, sentences=summary_sentences(results),
                           actions=experiment_actions(view), can_ask_offline=can_ask)


def _stored_offline(exp: db.Experiment) -> tuple[offline_comparison.OfflineResult, bool]:
    """The offline comparison stored for the experiment's current inputs, as the results route would show it,
    without asking a worker for one; and whether one can be asked for (False: the experiment cannot have one,
    e.g. it has no scope group, and the reason is the result's detail)."""
    settings = context.settings()
    session = context.session()
    found = offline_comparison.inputs(session, exp, settings.model)
    if isinstance(found, str):
        return offline_comparison.unavailable(found), False
    row = session.scalar(select(db.OfflineComparisonRow).where(
        db.OfflineComparisonRow.tenant_id == exp.tenant_id, db.OfflineComparisonRow.experiment_id == exp.id,
        db.OfflineComparisonRow.inputs_sha256 == found.sha256))
    if row is None:
        n = len(found.items)
        return offline_comparison.unavailable(f"not asked for yet: a worker scores each variant on {n} opinion items "
                                              "of the scope", items=n), True
    return offline_comparison.view(row, len(found.items)), True


def experiment_actions(view: Any) -> list[str]:
    """The state changes that apply: pause a running experiment, resume a paused one, stop either; none once
    it is stopped or its time window has ended."""
    if view.status == "stopped" or view.state == "ended":
        return []
    return (["pause"] if view.status == "running" else ["resume"]) + ["stop"]


@bp.get("/experiments/<experiment_id>/results.png")
@sessions.signed_in
def experiment_plot(experiment_id: str) -> BaseResponse:
    response = Response(ex.results_png(context.session(), _experiment(experiment_id)), mimetype="image/png")
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.post("/experiments/<experiment_id>/<action>")
@sessions.signed_in
def experiment_action(experiment_id: str, action: str) -> BaseResponse:
    if action not in ("pause", "resume", "stop"):
        raise not_found(f"action {action!r}", "action")
    ex.transition(_experiment(experiment_id), action)
    return redirect(url_for("console.experiment_page", experiment_id=experiment_id))


TEST_NAMES = {"welch_t": "Welch's t-test", "two_proportion_z": "two-proportion z-test",
              "barnard_exact": "Barnard's exact test"}


def summary_sentences(results: Any) -> list[str]:
    """The statistical summary in words: one sentence per variant against the control (a direction only
    when the difference is significant), the split of users against the weights, the winner."""
    out = []
    level = f"{results.confidence:.0%}"
    control = next(v for v in results.variants if v.is_control)
    for v in results.variants:
        c = v.vs_control
        if c is None:
            continue
        if c.verdict == "not enough data" or c.difference is None or c.p_value is None:
            out.append(f"{v.name} vs {results.control}: not enough data, too little feedback to compare yet "
                       f"({v.feedback} and {control.feedback} rewards; a verdict needs {results.min_per_arm} "
                       "on each side).")
            continue
        detail = (f"{level} interval {_fmt(c.ci_low)} to {_fmt(c.ci_high)}, p = {c.p_value:.3g}, "
                  f"{TEST_NAMES.get(c.test, c.test)}")
        if c.significant:
            direction = "better" if c.difference > 0 else "worse"
            out.append(f"{v.name} is {direction} than {results.control} by {abs(c.difference):.3f} ({detail}): "
                       f"significant at α = {results.alpha:g}.")
        else:
            out.append(f"{v.name} vs {results.control}: no significant difference at α = {results.alpha:g} "
                       f"(difference {c.difference:+.3f}, {detail}).")
    split = split_sentence(results)
    if split:
        out.append(split)
    if results.winner:
        out.append(f"Winner: {results.winner}.")
    return out


def split_sentence(results: Any) -> str | None:
    """The users per variant against the shares the weights ask, with the sample-ratio check."""
    total = sum(v.assigned for v in results.variants)
    if not total:
        return None
    parts = ", ".join(f"{v.name} {v.assigned} ({v.observed_share:.0%}; weights ask {v.share:.0%})"
                      for v in results.variants)
    srm = results.sample_ratio
    if srm.p_value is None:
        return f"Split of {total} users: {parts}."
    if srm.mismatch:
        return (f"Sample ratio mismatch: {total} users split {parts} (χ² p = {srm.p_value:.2g} < "
                f"{srm.threshold:g}): the assignment or its logging is off, and the comparison may be biased.")
    check = (f"sample-ratio check χ² p = {srm.p_value:.3g}, flagged below {srm.threshold:g}" if srm.enough_data
             else "too few users yet for the sample-ratio check")
    return f"Split of {total} users: {parts} ({check})."


# ------------------------------------------------------------------------------------------ playground

@bp.get("/playground")
@sessions.signed_in
def playground() -> str:
    return render_template("console/playground.html", ready=_ready_profiles(), model=context.settings().model)


@bp.post("/playground/chat")
@sessions.signed_in
def playground_chat() -> Any:
    """A chat completion through the API's own function (JSON body as for /v1/chat/completions)."""
    from service.api.openapi import to_response

    return to_response(chat.complete_chat(parse_body(ChatCompletionRequest)))


@bp.post("/playground/score")
@sessions.signed_in
def playground_score() -> Any:
    """Answer distributions through the API's own function (JSON body as for /v1/score)."""
    from service.api.openapi import to_response

    return to_response(chat.score_questions(parse_body(ScoreRequest)))
