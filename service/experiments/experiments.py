"""A/B experiments between blends of profiles: creation, assignment, exposures, feedback and results.

Assignment: a user's variant is `choose_variant(weights, assign_bucket(salt, experiment, user))`, a
deterministic salted hash (the same in every process and after restarts), stored at first assignment so
that later weight changes only steer new users. While an experiment is not running (paused, stopped,
before its start, after its end) every request gets the control and nothing is assigned or recorded.

The chat endpoint calls `resolve_experiment` before generating and `record_exposure` after; feedback names
the response id an exposure recorded. Results: per variant, exposures, feedback, mean reward with its
interval, and the difference to the control with a p-value (`service.experiments.stats`), plus the stored
offline comparison of the variants on the scope group's opinion items (`service.experiments.offline_comparison`).

Every function takes the tenant id and filters by it; errors are `service.experiments.errors`' (the API
maps them to HTTP) naming the request field, raised before anything is written (the route's transaction
then stores nothing).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.experiments.errors import ExperimentStopped, Invalid, NotFound, ProfileNotReady
from service.experiments.offline_comparison import OfflineResult
from service.experiments.stats import (
    ALPHA,
    CONFIDENCE,
    MIN_PER_ARM,
    SRM_ALPHA,
    PlotBar,
    RewardSummary,
    assign_bucket,
    choose_variant,
    compare,
    rewards_png,
    sample_ratio_check,
    summarize_rewards,
)
from service.protocol import (
    ControlComparison,
    ExperimentCreate,
    ExperimentOut,
    ExperimentResults,
    ExperimentState,
    FeedbackIn,
    ProfileWeightOut,
    RewardStats,
    SampleRatioCheck,
    ScopeOut,
    VariantOut,
    VariantResult,
)
from service.store import db

THUMBS = {"up": 1.0, "down": 0.0, True: 1.0, False: 0.0}

# ------------------------------------------------------------------------------------------- lookups

def get_experiment(session: Session, tenant_id: int, experiment_id: str) -> db.Experiment | None:
    return session.scalar(select(db.Experiment).where(db.Experiment.id == experiment_id,
                                                      db.Experiment.tenant_id == tenant_id))


def require_experiment(session: Session, tenant_id: int, experiment_id: str, field: str = "id") -> db.Experiment:
    """The tenant's experiment, or 404 naming `field` (another tenant's is just not found)."""
    exp = get_experiment(session, tenant_id, experiment_id) if isinstance(experiment_id, str) else None
    if exp is None:
        raise NotFound(f"experiment {experiment_id!r}", field)
    return exp


def list_experiments(session: Session, tenant_id: int, limit: int, after: str | None) -> list[db.Experiment]:
    """The tenant's experiments, newest first; `after` is the last id of the previous page."""
    query = select(db.Experiment).where(db.Experiment.tenant_id == tenant_id)
    if after is not None:
        anchor = require_experiment(session, tenant_id, after, "after")
        query = query.where((db.Experiment.created_at < anchor.created_at) |
                            ((db.Experiment.created_at == anchor.created_at) & (db.Experiment.id < anchor.id)))
    return list(session.scalars(query.order_by(db.Experiment.created_at.desc(), db.Experiment.id.desc())
                                .limit(limit)))


def state_of(exp: db.Experiment, now: datetime | None = None) -> ExperimentState:
    """The status seen through the time window: scheduled, running, paused, stopped or ended."""
    if exp.status in ("stopped", "paused"):
        return exp.status
    now = now or db.utcnow()
    if now < exp.starts_at:
        return "scheduled"
    if exp.ends_at is not None and now >= exp.ends_at:
        return "ended"
    return "running"


def variant_by_name(exp: db.Experiment, name: str) -> db.ExperimentVariant | None:
    return next((v for v in exp.variants if v.name == name), None)


def control_variant(exp: db.Experiment) -> db.ExperimentVariant:
    variant = variant_by_name(exp, exp.control)
    assert variant is not None  # creation guarantees it
    return variant


# ------------------------------------------------------------------------------------------ creation

def check_weight(value: float, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise Invalid("must be a finite number >= 0", field)
    return float(value)


def check_traffic(weights: Sequence[float], field: str) -> None:
    if not math.fsum(weights) > 0:
        raise Invalid("the traffic weights must sum to a positive number", field)


def check_blend(session: Session, tenant_id: int, blend: Sequence[Any], field: str, model: str,
                max_profiles: int) -> list[dict[str, Any]]:
    """A variant's profiles as stored: each of this tenant, ready and of the served model; no repeats."""
    if len(blend) > max_profiles:
        raise Invalid(f"at most {max_profiles} profiles in one blend", field)
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for j, entry in enumerate(blend):
        where = f"{field}[{j}]"
        weight = check_weight(entry.weight, f"{where}.weight")
        if entry.id in seen:
            raise Invalid(f"profile {entry.id!r} appears twice in this blend", f"{where}.id")
        seen.add(entry.id)
        row = db.get_profile(session, tenant_id, entry.id)
        if row is None:
            raise NotFound(f"profile {entry.id!r}", f"{where}.id")
        if row.status != "ready":
            raise ProfileNotReady(f"profile {entry.id} is {row.status}; a variant needs ready profiles",
                                  f"{where}.id")
        if row.model != model:
            raise Invalid(f"profile {entry.id} is for model {row.model!r}; this deployment serves {model!r}",
                          f"{where}.id")
        out.append({"id": row.id, "weight": weight})
    return out


def create_experiment(session: Session, tenant_id: int, body: ExperimentCreate, *, model: str,
                      max_profiles: int) -> db.Experiment:
    """Validate `body` completely, then store the experiment and its variants (nothing on any error)."""
    names = [v.name for v in body.variants]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise Invalid(f"variant name {name!r} is used twice", f"variants[{i}].name")
    control = body.control if body.control is not None else names[0]
    if control not in names:
        raise Invalid(f"no variant named {control!r}", "control")
    weights = [check_weight(v.weight, f"variants[{i}].weight") for i, v in enumerate(body.variants)]
    check_traffic(weights, "variants")
    blends = [check_blend(session, tenant_id, v.profiles, f"variants[{i}].profiles", model, max_profiles)
              for i, v in enumerate(body.variants)]
    scope_id = None
    if body.scope is not None:
        group = db.get_group(session, tenant_id, body.scope.group)
        if group is None:
            raise NotFound(f"group {body.scope.group!r}", "scope.group")
        scope_id = group.id
    now = db.utcnow()
    starts_at = body.starts_at or now
    if body.ends_at is not None:
        if body.ends_at <= starts_at:
            raise Invalid("must be after starts_at", "ends_at")
        if body.ends_at <= now:
            raise Invalid("must be in the future", "ends_at")
    exp = db.Experiment(tenant_id=tenant_id, name=body.name, status="running", reward_kind=body.reward,
                        scope_group_id=scope_id, control=control, salt=secrets.token_hex(16),
                        starts_at=starts_at, ends_at=body.ends_at, created_at=now, updated_at=now)
    exp.variants = [db.ExperimentVariant(tenant_id=tenant_id, name=name, position=i, weight=weights[i],
                                         profiles=blends[i]) for i, name in enumerate(names)]
    session.add(exp)
    session.flush()
    return exp


# ------------------------------------------------------------------------------------- state changes

def transition(exp: db.Experiment, action: str) -> None:
    """pause (running -> paused), resume (paused -> running), stop (-> stopped, final). Repeating an action
    changes nothing; anything but stop on a stopped experiment is a 409."""
    if exp.status == "stopped":
        if action == "stop":
            return
        raise ExperimentStopped("the experiment is stopped; stopping is final", "status")
    targets: dict[str, db.ExperimentStatus] = {"pause": "paused", "resume": "running", "stop": "stopped"}
    target = targets[action]
    if exp.status == target:
        return
    exp.status = target
    exp.updated_at = db.utcnow()
    if target == "stopped":
        exp.stopped_at = exp.updated_at


def update_experiment(exp: db.Experiment, weights: dict[str, float] | None, ends_at: datetime | None) -> None:
    """New traffic weights (by variant name) and/or end time. Stored assignments are kept, so only users
    not yet assigned follow the new weights."""
    if exp.status == "stopped":
        raise ExperimentStopped("the experiment is stopped", "status")
    if weights is not None:
        new = {v.name: v.weight for v in exp.variants}
        for name, value in weights.items():
            if name not in new:
                raise Invalid(f"no variant named {name!r}", f"weights.{name}")
            new[name] = check_weight(value, f"weights.{name}")
        check_traffic(list(new.values()), "weights")
        for v in exp.variants:
            v.weight = new[v.name]
    if ends_at is not None:
        if ends_at <= exp.starts_at or ends_at <= db.utcnow():
            raise Invalid("must be after starts_at and in the future", "ends_at")
        exp.ends_at = ends_at
    exp.updated_at = db.utcnow()


# ---------------------------------------------------------------------------------------- assignment

def check_in_scope(session: Session, exp: db.Experiment, uid: str, field: str) -> None:
    """422 unless `uid` may take part: anyone without a scope, else a member of the scope group."""
    if exp.scope_group_id is None:
        return
    user = db.get_user(session, exp.tenant_id, uid)
    member = user is not None and session.scalar(
        select(func.count()).select_from(db.GroupMember).where(
            db.GroupMember.group_id == exp.scope_group_id, db.GroupMember.user_id == user.id))
    if not member:
        gid = db.subject_name(session, exp.tenant_id, "group", exp.scope_group_id)
        raise Invalid(f"user {uid!r} is not a member of group {gid!r}, the experiment's scope", field)


def assign(session: Session, exp: db.Experiment, uid: str, field: str = "user",
           now: datetime | None = None) -> tuple[db.ExperimentVariant, bool]:
    """The user's variant and whether the experiment is live. A live experiment stores the assignment at
    the user's first request; a stored one is kept whatever the weights say now."""
    check_in_scope(session, exp, uid, field)
    if state_of(exp, now) != "running":
        return control_variant(exp), False
    stored = _stored_assignment(session, exp, uid)
    if stored is not None:
        return stored, True
    weights = [v.weight for v in exp.variants]
    variant = exp.variants[choose_variant(weights, assign_bucket(exp.salt, exp.id, uid))]
    # Stored in its own short transaction, committed now: the chat request that asks is about to generate
    # for seconds, and holding SQLite's database-wide write lock that long would serialize every request.
    # Storing early is harmless: it pins the variant the hash gives now, even if generation then fails.
    try:
        with Session(session.get_bind()) as own, own.begin():
            own.add(db.Assignment(tenant_id=exp.tenant_id, experiment_id=exp.id, variant_id=variant.id, uid=uid))
    except IntegrityError:
        # A concurrent first request of the same user stored it first: theirs is ours.
        stored = _stored_assignment(session, exp, uid, fresh=True)
        if stored is None:
            raise
        return stored, True
    return variant, True


def _stored_assignment(session: Session, exp: db.Experiment, uid: str,
                       fresh: bool = False) -> db.ExperimentVariant | None:
    query = select(db.Assignment.variant_id).where(
        db.Assignment.experiment_id == exp.id, db.Assignment.tenant_id == exp.tenant_id, db.Assignment.uid == uid)
    if fresh:  # a row another transaction just committed: read it outside this session's snapshot
        with Session(session.get_bind()) as own:
            variant_id = own.scalar(query)
    else:
        variant_id = session.scalar(query)
    return next((v for v in exp.variants if v.id == variant_id), None) if variant_id is not None else None


def blend_of(variant: db.ExperimentVariant) -> list[tuple[str, float]]:
    return [(str(p["id"]), float(p["weight"])) for p in variant.profiles]


def resolve_experiment(session: Session, tenant_id: int, experiment_id: str,
                       user: str | None) -> tuple[str, list[tuple[str, float]]]:
    """The variant a chat request of `user` gets: (variant name, [(profile id, weight)]); an empty blend is
    the unsteered model. 404 for an unknown experiment, 422 without a user or for a user outside the scope.
    While the experiment is not running this is the control and nothing is stored."""
    exp = require_experiment(session, tenant_id, experiment_id, "steering.experiment")
    if not user:
        raise Invalid("a request with an experiment needs the `user` it is for", "user")
    variant, _ = assign(session, exp, user, "user")
    return variant.name, blend_of(variant)


def record_exposure(session: Session, tenant_id: int, experiment_id: str, variant: str, user: str,
                    response_id: str) -> db.Exposure | None:
    """Record that `response_id` was served to `user` under `variant`. Nothing is recorded (None) while
    the experiment is not running: those responses were the control outside the test."""
    exp = get_experiment(session, tenant_id, experiment_id)
    if exp is None or state_of(exp) != "running":
        return None
    v = variant_by_name(exp, variant)
    if v is None:
        raise ValueError(f"experiment {experiment_id} has no variant {variant!r}")
    exposure = db.Exposure(tenant_id=tenant_id, experiment_id=exp.id, variant_id=v.id, uid=user,
                           response_id=response_id)
    session.add(exposure)
    session.flush()
    return exposure


# ------------------------------------------------------------------------------------------ feedback

def feedback_reward(exp: db.Experiment, body: FeedbackIn) -> float:
    """The numeric reward of a feedback body: exactly one of thumbs/rating/value, the experiment's kind."""
    given = [name for name in ("thumbs", "rating", "value") if getattr(body, name) is not None]
    wanted = {"thumbs": "thumbs", "rating": "rating", "number": "value"}[exp.reward_kind]
    if not given:
        raise Invalid(f"give the reward as `{wanted}`", wanted)
    if len(given) > 1:
        raise Invalid(f"give exactly one of thumbs, rating and value (got {', '.join(given)})", given[1])
    if given[0] != wanted:
        raise Invalid(f"this experiment collects {exp.reward_kind} feedback: give `{wanted}`", given[0])
    # Exactly the wanted field is given (checked above).
    if body.thumbs is not None:
        return THUMBS[body.thumbs]
    if body.rating is not None:
        return float(body.rating)
    assert body.value is not None
    value = float(body.value)
    if not math.isfinite(value):
        raise Invalid("must be a finite number", "value")
    return value


def record_feedback(session: Session, exp: db.Experiment, body: FeedbackIn) -> tuple[db.Feedback, db.Exposure, bool]:
    """Store the reward of one response of this experiment; posting again for the same response replaces
    it (one reward per response). 404 for a response id this experiment (of this tenant) did not serve."""
    reward = feedback_reward(exp, body)
    exposure = session.scalar(select(db.Exposure).where(
        db.Exposure.tenant_id == exp.tenant_id, db.Exposure.experiment_id == exp.id,
        db.Exposure.response_id == body.response_id))
    if exposure is None:
        raise NotFound(f"response {body.response_id!r} of this experiment", "response_id")
    existing = _feedback_of(session, exposure)
    if existing is None:
        row = db.Feedback(tenant_id=exp.tenant_id, experiment_id=exp.id, variant_id=exposure.variant_id,
                          exposure_id=exposure.id, kind=exp.reward_kind, reward=reward)
        try:
            with session.begin_nested():
                session.add(row)
            return row, exposure, True
        except IntegrityError:
            existing = _feedback_of(session, exposure)
            if existing is None:
                raise
    if existing.reward != reward:
        existing.reward = reward
        existing.updated_at = db.utcnow()
    return existing, exposure, False


def _feedback_of(session: Session, exposure: db.Exposure) -> db.Feedback | None:
    return session.scalar(select(db.Feedback).where(db.Feedback.exposure_id == exposure.id,
                                                    db.Feedback.tenant_id == exposure.tenant_id))


# ------------------------------------------------------------------------------------------- views

def _counts(session: Session, model: type[db.Assignment] | type[db.Exposure], exp: db.Experiment) -> dict[int, int]:
    rows = session.execute(select(model.variant_id, func.count()).where(
        model.tenant_id == exp.tenant_id, model.experiment_id == exp.id).group_by(model.variant_id))
    return {int(vid): int(n) for vid, n in rows}


def experiment_view(session: Session, exp: db.Experiment) -> ExperimentOut:
    assigned = _counts(session, db.Assignment, exp)
    total = math.fsum(v.weight for v in exp.variants)
    scope = None
    if exp.scope_group_id is not None:
        scope = ScopeOut(group=db.subject_name(session, exp.tenant_id, "group", exp.scope_group_id) or "")
    return ExperimentOut(
        id=exp.id, name=exp.name, status=exp.status, state=state_of(exp), reward=exp.reward_kind,
        control=exp.control, scope=scope, starts_at=exp.starts_at, ends_at=exp.ends_at,
        stopped_at=exp.stopped_at, created_at=exp.created_at, updated_at=exp.updated_at,
        variants=[VariantOut(name=v.name, weight=v.weight, share=v.weight / total if total > 0 else 0.0,
                             profiles=profile_refs(v), is_control=v.name == exp.control,
                             assigned=assigned.get(v.id, 0)) for v in exp.variants])


def profile_refs(variant: db.ExperimentVariant) -> list[ProfileWeightOut]:
    """A variant's blend as it is shown in responses."""
    return [ProfileWeightOut(id=pid, weight=w) for pid, w in blend_of(variant)]


# ------------------------------------------------------------------------------------------- results

def variant_rewards(session: Session, exp: db.Experiment) -> dict[int, list[float]]:
    rows = session.execute(select(db.Feedback.variant_id, db.Feedback.reward).where(
        db.Feedback.tenant_id == exp.tenant_id, db.Feedback.experiment_id == exp.id).order_by(db.Feedback.id))
    out: dict[int, list[float]] = {v.id: [] for v in exp.variants}
    for vid, reward in rows:
        out.setdefault(int(vid), []).append(float(reward))
    return out


def summaries(session: Session, exp: db.Experiment) -> tuple[dict[int, list[float]], dict[int, RewardSummary]]:
    rewards = variant_rewards(session, exp)
    return rewards, {vid: summarize_rewards(vals, exp.reward_kind) for vid, vals in rewards.items()}


def experiment_results(session: Session, exp: db.Experiment, offline: OfflineResult) -> ExperimentResults:
    """Per-variant exposures, feedback, mean reward with its interval, the test against the control (a
    verdict only from `MIN_PER_ARM` rewards a side), the offline scores, the split of users against the
    weights with its sample-ratio check, and the winner (best mean among variants significantly better
    than the control)."""
    assigned = _counts(session, db.Assignment, exp)
    exposures = _counts(session, db.Exposure, exp)
    rewards, summary = summaries(session, exp)
    control = control_variant(exp)
    total_weight = math.fsum(v.weight for v in exp.variants)
    total_assigned = sum(assigned.get(v.id, 0) for v in exp.variants)
    out: list[VariantResult] = []
    winner: tuple[float, str] | None = None
    for v in exp.variants:
        s = summary[v.id]
        vs = None
        if v.id != control.id:
            c = compare(rewards[v.id], rewards[control.id], exp.reward_kind, ALPHA)
            vs = ControlComparison(test=c.test, difference=c.difference, ci_low=c.ci_low, ci_high=c.ci_high,
                                   statistic=_finite(c.statistic), p_value=c.p_value, df=c.df,
                                   significant=c.significant, enough_data=c.enough_data, verdict=c.verdict)
            if c.verdict == "better" and s.mean is not None and (winner is None or s.mean > winner[0]):
                winner = (s.mean, v.name)
        out.append(VariantResult(
            name=v.name, is_control=v.id == control.id, weight=v.weight, profiles=profile_refs(v),
            share=v.weight / total_weight if total_weight > 0 else 0.0,
            observed_share=assigned.get(v.id, 0) / total_assigned if total_assigned else None,
            assigned=assigned.get(v.id, 0), exposures=exposures.get(v.id, 0), feedback=s.n,
            reward=RewardStats(n=s.n, mean=s.mean, std=s.std, ci_low=s.ci_low, ci_high=s.ci_high,
                               successes=s.successes),
            vs_control=vs, offline=offline.scores.get(v.name)))
    # Users, not exposures: the user is what the hash assigns, and how often a user chats may depend on
    # the variant itself.
    srm = sample_ratio_check([assigned.get(v.id, 0) for v in exp.variants], [v.weight for v in exp.variants])
    sample_ratio = SampleRatioCheck(unit="assigned users", statistic=srm.statistic, p_value=srm.p_value,
                                    threshold=SRM_ALPHA, enough_data=srm.enough_data, mismatch=srm.mismatch)
    return ExperimentResults(experiment_id=exp.id, name=exp.name, state=state_of(exp), reward=exp.reward_kind,
                             control=exp.control, confidence=CONFIDENCE, alpha=ALPHA, min_per_arm=MIN_PER_ARM,
                             sample_ratio=sample_ratio, variants=out, winner=winner[1] if winner else None,
                             offline=offline.comparison)


def _finite(x: float | None) -> float | None:
    # JSON has no infinity: a degenerate test (zero variance on both sides) reports its p-value only.
    return x if x is None or math.isfinite(x) else None


def results_png(session: Session, exp: db.Experiment) -> bytes:
    _, summary = summaries(session, exp)
    bars = [PlotBar(v.name, summary[v.id], v.name == exp.control) for v in exp.variants]
    return rewards_png(bars, f"{exp.name} ({state_of(exp)})", exp.reward_kind)
