"""The database layer shared by the API and the worker: SQLAlchemy 2 models, sessions, tenant-scoped queries.

Every query helper that reads tenant data takes `tenant_id` and filters by it, so a key of one tenant can
never reach another tenant's rows. The one exception is `profile_by_id`, used by the worker:
a Celery task carries only a profile id (a random uuid that the API itself enqueued).

Schema changes go through Alembic (`migrations/`); `upgrade(url)` runs them to head. The experiment
tables (A/B tests) follow the profile models; revision 0002 creates them, 0004 the stored offline comparisons,
0005 the profiles' `sent_at`. A profile build's states and their changes are `service.builds`'s.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
import uuid
from collections.abc import Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

from steer_core.data import OpinionItem, make_item, question_key, with_contrast

if TYPE_CHECKING:
    from service.settings import Settings

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"

SUBJECT_KINDS = ("user", "group")
PROFILE_STATUSES = ("queued", "building", "ready", "failed")
ATTEMPT_STATUSES = ("running", "succeeded", "failed", "retrying", "lost")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite drops the zone; this puts it back)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime stored; use service.store.db.utcnow()")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# JSONB on PostgreSQL (indexable, compact), JSON text elsewhere.
JSONType = JSON().with_variant(JSONB(), "postgresql")

IntPK = Annotated[int, mapped_column(Integer, primary_key=True, autoincrement=True)]
Created = Annotated[datetime, mapped_column(UTCDateTime(), default=utcnow, nullable=False)]
TenantFK = Annotated[int, mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True,
                                        nullable=False)]

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


# The values of enumerated columns (the API validates what is written; mypy checks what is read).
SubjectKind = Literal["user", "group"]
ProfileStatus = Literal["queued", "building", "ready", "failed"]
ExperimentStatus = Literal["running", "paused", "stopped"]
RewardKind = Literal["thumbs", "rating", "number"]
ComparisonStatus = Literal["queued", "running", "ready", "failed"]
PopulationStatus = Literal["queued", "building", "ready", "failed"]


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[IntPK]
    name: Mapped[str] = mapped_column(String(200), unique=True, nullable=False)
    created_at: Mapped[Created]


class ApiKey(Base):
    """A bearer key. Only its sha256 is stored; `prefix` is the first characters, to tell keys apart."""

    __tablename__ = "api_keys"

    id: Mapped[IntPK]
    tenant_id: Mapped[TenantFK]
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    prefix: Mapped[str] = mapped_column(String(32), nullable=False)
    name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[Created]
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    tenant: Mapped[Tenant] = relationship()


class User(Base):
    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("tenant_id", "uid"),)

    id: Mapped[IntPK]
    tenant_id: Mapped[TenantFK]
    uid: Mapped[str] = mapped_column(String(200), nullable=False)
    attributes: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict, nullable=False)
    # The profile applied to this user's chat requests when the request names none.
    default_profile_id: Mapped[str | None] = mapped_column(
        ForeignKey("profiles.id", ondelete="SET NULL"), nullable=True)
    created_at: Mapped[Created]
    updated_at: Mapped[Created]


class Group(Base):
    __tablename__ = "groups"
    __table_args__ = (UniqueConstraint("tenant_id", "gid"),)

    id: Mapped[IntPK]
    tenant_id: Mapped[TenantFK]
    gid: Mapped[str] = mapped_column(String(200), nullable=False)
    attributes: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict, nullable=False)
    created_at: Mapped[Created]
    updated_at: Mapped[Created]


class GroupMember(Base):
    __tablename__ = "group_members"

    group_id: Mapped[int] = mapped_column(ForeignKey("groups.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True,
                                         index=True)


class OpinionRow(Base):
    """One opinion item of a user (their answer, one-hot) or a group (a distribution).

    `item_id` is the item's own id, or a hash of its question and options when it has none; posting an
    item with an id the subject already has replaces that item (a person may change their answer).
    """

    __tablename__ = "opinions"
    __table_args__ = (
        UniqueConstraint("user_id", "item_id"),
        UniqueConstraint("group_id", "item_id"),
        CheckConstraint("(subject_kind = 'user' AND user_id IS NOT NULL AND group_id IS NULL) OR "
                        "(subject_kind = 'group' AND group_id IS NOT NULL AND user_id IS NULL)",
                        name="one_subject"),
    )

    id: Mapped[IntPK]
    tenant_id: Mapped[TenantFK]
    subject_kind: Mapped[SubjectKind] = mapped_column(String(16), nullable=False)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=True)
    group_id: Mapped[int | None] = mapped_column(ForeignKey("groups.id", ondelete="CASCADE"), nullable=True)
    item_id: Mapped[str] = mapped_column(String(200), nullable=False)
    question: Mapped[str] = mapped_column(Text, nullable=False)
    options: Mapped[list[str]] = mapped_column(JSONType, nullable=False)
    ordinal: Mapped[list[float]] = mapped_column(JSONType, nullable=False)
    target: Mapped[list[float]] = mapped_column(JSONType, nullable=False)
    created_at: Mapped[Created]

    def to_item(self) -> OpinionItem:
        return OpinionItem(question=self.question, options=tuple(self.options), target=tuple(self.target),
                           ordinal=tuple(self.ordinal), id=self.item_id)


class ProfileRow(Base):
    """A steering profile of one subject: its build request, build state and, once ready, its artifact.

    `subject_id` is `users.id` or `groups.id` by `subject_kind` (the internal ids, not `uid`/`gid`).
    `progress` is `{"done", "total", "stage"}`; `metrics` is the build's metrics dict (held-out scores
    before/after and the search); `chosen` the hyperparameters the build settled on (layer, strength,
    positions, method params). `version` numbers the profiles of one (subject, method, model): 1, 2, ...
    as the subject's sample changes. The unique key makes the same request on the same sample one row.
    """

    __tablename__ = "profiles"
    __table_args__ = (
        UniqueConstraint("tenant_id", "subject_kind", "subject_id", "method", "model", "params_hash",
                         "sample_hash", name="uq_profiles_request"),
        CheckConstraint("status IN ('queued', 'building', 'ready', 'failed')", name="status"),
        CheckConstraint("subject_kind IN ('user', 'group')", name="subject_kind"),
        Index("ix_profiles_subject", "tenant_id", "subject_kind", "subject_id"),
        Index("ix_profiles_status_updated", "status", "updated_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=lambda: str(uuid.uuid4()))
    tenant_id: Mapped[TenantFK]
    subject_kind: Mapped[SubjectKind] = mapped_column(String(16), nullable=False)
    subject_id: Mapped[int] = mapped_column(Integer, nullable=False)
    method: Mapped[str] = mapped_column(String(64), nullable=False)
    model: Mapped[str] = mapped_column(String(200), nullable=False)
    params: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict, nullable=False)
    params_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    sample_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    status: Mapped[ProfileStatus] = mapped_column(String(16), default="queued", nullable=False)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    chosen: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    artifact_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    artifact_size: Mapped[int | None] = mapped_column(Integer, nullable=True)
    version: Mapped[int] = mapped_column(Integer, default=1, nullable=False)
    created_at: Mapped[Created]
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow,
                                                 nullable=False)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # When the broker last took this build's message; None until it has (see `service.builds.message_lost`).
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    attempts: Mapped[list[BuildAttempt]] = relationship(
        back_populates="profile", cascade="all, delete-orphan", passive_deletes=True,
        order_by="BuildAttempt.attempt")


class BuildAttempt(Base):
    """One try at building a profile by one worker (a redelivered or retried task is a new attempt)."""

    __tablename__ = "build_attempts"
    __table_args__ = (UniqueConstraint("profile_id", "attempt"),)

    id: Mapped[IntPK]
    profile_id: Mapped[str] = mapped_column(ForeignKey("profiles.id", ondelete="CASCADE"), nullable=False)
    attempt: Mapped[int] = mapped_column(Integer, nullable=False)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="running", nullable=False)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    started_at: Mapped[Created]
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    profile: Mapped[ProfileRow] = relationship(back_populates="attempts")


# --- populations: what a survey's groups share, learned once; subject profiles are fitted against one ---

class PopulationRow(Base):
    """A population of one tenant, learned by a worker from its subjects' answers to shared questions
    (`steer_core.population_build.learn_population`).

    `subjects` is the request's list of `{"kind", "id"}` (external ids); `sample_hash` names the sample it was
    learned from (the subjects' shared items), so a rebuild on the same answers is the same population.
    `progress` is `{"done", "total", "stage"}` and `updated_at` its heartbeat while `building`; `report` is
    what the build chose (`learn_population`'s report: blocks, strength, chat gain by strength, the
    questions' order) and `questions` the shared questions' item ids in the order the report indexes.
    """

    __tablename__ = "populations"
    __table_args__ = (
        UniqueConstraint("tenant_id", "name"),
        CheckConstraint("status IN ('queued', 'building', 'ready', 'failed')", name="status"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=lambda: str(uuid.uuid4()))
    tenant_id: Mapped[TenantFK]
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    model: Mapped[str] = mapped_column(String(200), nullable=False)
    subjects: Mapped[list[dict[str, str]]] = mapped_column(JSONType, nullable=False)
    sample_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    status: Mapped[PopulationStatus] = mapped_column(String(16), default="queued", nullable=False)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    report: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    questions: Mapped[list[str] | None] = mapped_column(JSONType, nullable=True)
    artifact_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    artifact_size: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[Created]
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow, nullable=False)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


def get_population(session: Session, tenant_id: int, population_id: str) -> PopulationRow | None:
    return session.scalar(select(PopulationRow).where(PopulationRow.tenant_id == tenant_id,
                                                      PopulationRow.id == population_id))


# --- experiments: A/B tests between blends of profiles ---

EXPERIMENT_STATUSES = ("running", "paused", "stopped")
REWARD_KINDS = ("thumbs", "rating", "number")
ExperimentFK = Annotated[str, mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"), nullable=False)]
VariantFK = Annotated[int, mapped_column(ForeignKey("experiment_variants.id", ondelete="CASCADE"), nullable=False)]


class Experiment(Base):
    """An A/B test of one tenant: two or more variants, traffic weights, an optional scope (a group's members)
    and a time window. `status` is what the tenant set (running, paused, stopped); outside
    [`starts_at`, `ends_at`) a running experiment serves its control and records nothing. `salt` is drawn once
    at creation and keys the deterministic assignment hash."""

    __tablename__ = "experiments"
    __table_args__ = (
        CheckConstraint("status IN ('running', 'paused', 'stopped')", name="status"),
        CheckConstraint("reward_kind IN ('thumbs', 'rating', 'number')", name="reward_kind"),
        Index("ix_experiments_tenant_created", "tenant_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=lambda: str(uuid.uuid4()))
    tenant_id: Mapped[TenantFK]
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    status: Mapped[ExperimentStatus] = mapped_column(String(16), default="running", nullable=False)
    reward_kind: Mapped[RewardKind] = mapped_column(String(16), nullable=False)
    scope_group_id: Mapped[int | None] = mapped_column(ForeignKey("groups.id", ondelete="RESTRICT"), nullable=True)
    control: Mapped[str] = mapped_column(String(64), nullable=False)  # the control variant's name
    salt: Mapped[str] = mapped_column(String(64), nullable=False)
    starts_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    ends_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_at: Mapped[Created]
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow, nullable=False)

    variants: Mapped[list[ExperimentVariant]] = relationship(
        back_populates="experiment", cascade="all, delete-orphan", passive_deletes=True,
        order_by="ExperimentVariant.position")


class ExperimentVariant(Base):
    """One arm: a blend of the tenant's profiles (`profiles` = [{"id", "weight"}]; empty = unsteered) and its
    traffic weight (relative; the weights of an experiment need not sum to 1)."""

    __tablename__ = "experiment_variants"
    __table_args__ = (UniqueConstraint("experiment_id", "name"), UniqueConstraint("experiment_id", "position"))

    id: Mapped[IntPK]
    tenant_id: Mapped[TenantFK]
    experiment_id: Mapped[ExperimentFK]
    name: Mapped[str] = mapped_column(String(64), nullable=False)
    position: Mapped[int] = mapped_column(Integer, nullable=False)
    weight: Mapped[float] = mapped_column(Float, nullable=False)
    profiles: Mapped[list[dict[str, Any]]] = mapped_column(JSONType, default=list, nullable=False)

    experiment: Mapped[Experiment] = relationship(back_populates="variants")


class Assignment(Base):
    """The variant a user was given, stored at first assignment so later weight changes leave them there."""

    __tablename__ = "experiment_assignments"
    __table_args__ = (UniqueConstraint("experiment_id", "uid"),)

    id: Mapped[IntPK]
    tenant_id: Mapped[TenantFK]
    experiment_id: Mapped[ExperimentFK]
    variant_id: Mapped[VariantFK]
    uid: Mapped[str] = mapped_column(String(200), nullable=False)
    created_at: Mapped[Created]


class Exposure(Base):
    """One response served under a variant (a chat completion's id), the thing feedback refers to."""

    __tablename__ = "experiment_exposures"
    __table_args__ = (UniqueConstraint("tenant_id", "response_id"),
                      Index("ix_experiment_exposures_variant", "experiment_id", "variant_id"))

    id: Mapped[IntPK]
    tenant_id: Mapped[TenantFK]
    experiment_id: Mapped[ExperimentFK]
    variant_id: Mapped[VariantFK]
    uid: Mapped[str] = mapped_column(String(200), nullable=False)
    response_id: Mapped[str] = mapped_column(String(200), nullable=False)
    created_at: Mapped[Created]


class Feedback(Base):
    """The reward given to one exposure (one per response: posting again replaces it). `reward` is numeric
    whatever the kind: thumbs up 1 / down 0, a rating 1..5, or any finite number."""

    __tablename__ = "experiment_feedback"
    __table_args__ = (UniqueConstraint("exposure_id"),
                      CheckConstraint("kind IN ('thumbs', 'rating', 'number')", name="kind"),
                      Index("ix_experiment_feedback_variant", "experiment_id", "variant_id"))

    id: Mapped[IntPK]
    tenant_id: Mapped[TenantFK]
    experiment_id: Mapped[ExperimentFK]
    variant_id: Mapped[VariantFK]
    exposure_id: Mapped[int] = mapped_column(ForeignKey("experiment_exposures.id", ondelete="CASCADE"),
                                             nullable=False)
    kind: Mapped[RewardKind] = mapped_column(String(16), nullable=False)
    reward: Mapped[float] = mapped_column(Float, nullable=False)
    created_at: Mapped[Created]
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow, nullable=False)



OFFLINE_STATUSES = ("queued", "running", "ready", "failed")


class OfflineComparisonRow(Base):
    """The offline comparison of an experiment's variants on opinion items, computed by a worker task and
    read back by the results endpoint. `inputs_sha256` names what it scores (the model, the items, each
    variant's blend with its profiles' artifacts), so a change of any of them asks for a new row; `result`
    is the stored comparison and per-variant scores once `ready`, `error` says why when `failed`."""

    __tablename__ = "offline_comparisons"
    __table_args__ = (
        UniqueConstraint("experiment_id", "inputs_sha256"),
        CheckConstraint("status IN ('queued', 'running', 'ready', 'failed')", name="status"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=lambda: str(uuid.uuid4()))
    tenant_id: Mapped[TenantFK]
    experiment_id: Mapped[ExperimentFK]
    inputs_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    status: Mapped[ComparisonStatus] = mapped_column(String(16), default="queued", nullable=False)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[Created]
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow, nullable=False)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

# ---------------------------------------------------------------------------------------------------------
# Engines and sessions

_engines: dict[str, Engine] = {}
_factories: dict[str, sessionmaker[Session]] = {}
_lock = threading.Lock()


def make_engine(url: str) -> Engine:
    """A new engine for `url`. SQLite gets foreign keys on, WAL and a busy timeout, since the API and a
    worker process write the same file; PostgreSQL gets pre-ping so a restarted server is survived."""
    if url.startswith("sqlite"):
        if url.startswith("sqlite:///") and url not in ("sqlite://", "sqlite:///:memory:"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "savepoint")
        def _begin_before_savepoint(conn: Any, _name: str) -> None:
            # pysqlite sends BEGIN only before INSERT/UPDATE/DELETE: a SAVEPOINT issued first would start
            # the transaction itself, and releasing it would COMMIT everything. Begin for real first.
            dbapi_conn = conn.connection.dbapi_connection
            if not dbapi_conn.in_transaction:
                dbapi_conn.execute("BEGIN")

        return engine
    return create_engine(url, pool_pre_ping=True)


def get_engine(url: str) -> Engine:
    """The process-wide engine for `url` (one pool per database)."""
    with _lock:
        if url not in _engines:
            _engines[url] = make_engine(url)
        return _engines[url]


def session_factory(settings: Settings | str) -> sessionmaker[Session]:
    """The process-wide session factory for the settings' database (or a URL)."""
    url = settings if isinstance(settings, str) else settings.database_url
    engine = get_engine(url)
    with _lock:
        if url not in _factories:
            _factories[url] = sessionmaker(engine, expire_on_commit=False)
        return _factories[url]


def dispose_engines(url: str | None = None) -> None:
    """Close pooled connections: of `url`, or of every engine (tests, and forked worker processes that
    must not share the parent's sockets)."""
    with _lock:
        urls = [url] if url is not None else list(_engines)
        for u in urls:
            engine = _engines.pop(u, None)
            _factories.pop(u, None)
            if engine is not None:
                engine.dispose()


def session_scope(settings: Settings | str) -> AbstractContextManager[Session]:
    """A session in a transaction that commits when the block ends and rolls back (and re-raises) when it
    raises: the settings' `sessionmaker.begin()`."""
    return session_factory(settings).begin()


def upgrade(url: str, revision: str = "head") -> None:
    """Run the Alembic migrations on `url` up to `revision`."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation: a literal % in a password must be doubled.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["database_url"] = url
    return cfg


def upgrade_cli(args: Any) -> int:
    """`pluristeer db upgrade [--database-url URL]`: migrate the configured database to head."""
    from service.settings import Settings

    url = getattr(args, "database_url", None) or Settings.from_env().database_url
    upgrade(url)
    print(f"database at {_safe_url(url)} is at the latest revision")
    return 0


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


# ---------------------------------------------------------------------------------------------------------
# Query helpers (always scoped by tenant_id)

def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def tenant_for_key(session: Session, key: str) -> Tenant | None:
    """The tenant of a live (not revoked) bearer key, or None."""
    row = session.scalar(select(ApiKey).where(ApiKey.key_sha256 == hash_key(key),
                                              ApiKey.revoked_at.is_(None)))
    return row.tenant if row is not None else None


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
    return tenant


def get_user(session: Session, tenant_id: int, uid: str) -> User | None:
    return session.scalar(select(User).where(User.tenant_id == tenant_id, User.uid == uid))


def get_group(session: Session, tenant_id: int, gid: str) -> Group | None:
    return session.scalar(select(Group).where(Group.tenant_id == tenant_id, Group.gid == gid))


def get_subject(session: Session, tenant_id: int, kind: str, external_id: str) -> User | Group | None:
    """A user by `uid` or a group by `gid` of this tenant."""
    if kind == "user":
        return get_user(session, tenant_id, external_id)
    if kind == "group":
        return get_group(session, tenant_id, external_id)
    raise ValueError(f"unknown subject kind {kind!r}")


def subject_by_id(session: Session, tenant_id: int, kind: str, subject_id: int) -> User | Group | None:
    if kind == "user":
        return session.scalar(select(User).where(User.id == subject_id, User.tenant_id == tenant_id))
    return session.scalar(select(Group).where(Group.id == subject_id, Group.tenant_id == tenant_id))


def subject_name(session: Session, tenant_id: int, kind: str, subject_id: int) -> str | None:
    """The external id (`uid`/`gid`) of a subject given its internal id."""
    subject = subject_by_id(session, tenant_id, kind, subject_id)
    if subject is None:
        return None
    return subject.uid if isinstance(subject, User) else subject.gid


def group_members(session: Session, tenant_id: int, group_id: int) -> list[User]:
    return list(session.scalars(
        select(User).join(GroupMember, GroupMember.user_id == User.id)
        .where(GroupMember.group_id == group_id, User.tenant_id == tenant_id).order_by(User.uid)))


def user_groups(session: Session, tenant_id: int, user_id: int) -> list[Group]:
    """The groups a user belongs to (a chat request blends a user's default profile with their groups')."""
    return list(session.scalars(
        select(Group).join(GroupMember, GroupMember.group_id == Group.id)
        .where(GroupMember.user_id == user_id, Group.tenant_id == tenant_id).order_by(Group.gid)))


def item_key(item: OpinionItem) -> str:
    """The stored id of an item: its own, or a hash of its question and options."""
    if item.id is not None:
        return item.id
    digest = hashlib.sha256(json.dumps([item.question, list(item.options)]).encode()).hexdigest()
    return f"q-{digest[:16]}"


def put_opinions(session: Session, tenant_id: int, subject: User | Group,
                 items: Sequence[OpinionItem]) -> list[OpinionRow]:
    """Store items for a subject, replacing items with the same id. The caller's transaction makes the
    batch all-or-nothing; items must already be validated (`steer_core.make_item`)."""
    kind = "user" if isinstance(subject, User) else "group"
    column = OpinionRow.user_id if kind == "user" else OpinionRow.group_id
    keys = [item_key(it) for it in items]
    existing = {row.item_id: row for row in session.scalars(
        select(OpinionRow).where(OpinionRow.tenant_id == tenant_id, column == subject.id,
                                 OpinionRow.item_id.in_(keys)))} if keys else {}
    rows = []
    for key, item in zip(keys, items, strict=True):
        row = existing.get(key)
        if row is None:
            row = OpinionRow(tenant_id=tenant_id, subject_kind=kind, item_id=key,
                             user_id=subject.id if kind == "user" else None,
                             group_id=subject.id if kind == "group" else None)
            session.add(row)
        row.question, row.options = item.question, list(item.options)
        row.ordinal, row.target = list(item.ordinal), list(item.target)
        rows.append(row)
    session.flush()
    return rows


def own_opinions(session: Session, tenant_id: int, kind: str, subject_id: int) -> list[OpinionRow]:
    """A subject's own stored items, oldest first (the order is part of the sample's hash)."""
    column = OpinionRow.user_id if kind == "user" else OpinionRow.group_id
    return list(session.scalars(select(OpinionRow).where(
        OpinionRow.tenant_id == tenant_id, OpinionRow.subject_kind == kind, column == subject_id)
        .order_by(OpinionRow.id)))


def subject_items(session: Session, tenant_id: int, kind: str, subject_id: int) -> list[OpinionItem]:
    """The sample a profile of this subject is built from.

    A user's items are their own answers. A group's items are its own distributions plus, for each other
    question its members answered, the members' answers averaged into a distribution (one vote each).
    Members' answers to one question are pooled when they share question text and options; a group's own
    item for that question (same id or same text and options) takes precedence.
    """
    own = [row.to_item() for row in own_opinions(session, tenant_id, kind, subject_id)]
    if kind == "user":
        return own
    covered_ids = {it.id for it in own}
    covered_text = {(it.question, it.options) for it in own}
    pooled: dict[tuple[str, tuple[str, ...]], list[OpinionRow]] = {}
    member_rows = session.scalars(
        select(OpinionRow).join(GroupMember, GroupMember.user_id == OpinionRow.user_id)
        .where(GroupMember.group_id == subject_id, OpinionRow.tenant_id == tenant_id,
               OpinionRow.subject_kind == "user").order_by(OpinionRow.id))
    for row in member_rows:
        key = (row.question, tuple(row.options))
        if key in covered_text or row.item_id in covered_ids:
            continue
        pooled.setdefault(key, []).append(row)
    aggregated = []
    for rows in pooled.values():
        n = len(rows)
        target = [sum(r.target[k] for r in rows) / n for k in range(len(rows[0].options))]
        first = rows[0]
        aggregated.append(make_item(first.question, first.options, target=target, ordinal=first.ordinal,
                                    id=first.item_id, field="group.members"))
    return own + aggregated


def params_hash(params: dict[str, Any]) -> str:
    """A stable hash of build params (key order does not matter)."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def get_profile(session: Session, tenant_id: int, profile_id: str) -> ProfileRow | None:
    return session.scalar(select(ProfileRow).where(ProfileRow.id == profile_id,
                                                   ProfileRow.tenant_id == tenant_id))


def list_profiles(session: Session, tenant_id: int, *, kind: str | None = None, subject_id: int | None = None,
                  status: str | None = None, method: str | None = None, limit: int = 100,
                  after: str | None = None) -> list[ProfileRow]:
    """A tenant's profiles, newest first; `after` is the last id of the previous page."""
    query = select(ProfileRow).where(ProfileRow.tenant_id == tenant_id)
    if kind is not None:
        query = query.where(ProfileRow.subject_kind == kind)
    if subject_id is not None:
        query = query.where(ProfileRow.subject_id == subject_id)
    if status is not None:
        query = query.where(ProfileRow.status == status)
    if method is not None:
        query = query.where(ProfileRow.method == method)
    if after is not None:
        anchor = get_profile(session, tenant_id, after)
        if anchor is not None:
            query = query.where((ProfileRow.created_at < anchor.created_at) |
                                ((ProfileRow.created_at == anchor.created_at) & (ProfileRow.id < anchor.id)))
    query = query.order_by(ProfileRow.created_at.desc(), ProfileRow.id.desc()).limit(limit)
    return list(session.scalars(query))


# The error of a profile whose artifact failed its check when read (`service.builds.fail_broken_artifact`).
BROKEN_ARTIFACT = "artifact unusable"


def count_broken_artifacts(session: Session) -> int:
    """Failed profiles whose artifact broke, over all tenants (for /readyz; no ids, no tenants)."""
    return int(session.scalar(select(func.count()).select_from(ProfileRow).where(
        ProfileRow.status == "failed", ProfileRow.error.startswith(BROKEN_ARTIFACT))) or 0)


def profiles_sharing_artifact(session: Session, sha256: str, exclude_id: str | None = None) -> int:
    """How many profiles (of any tenant) point at this artifact: a file is deleted only at zero."""
    query = select(func.count()).select_from(ProfileRow).where(ProfileRow.artifact_sha256 == sha256)
    if exclude_id is not None:
        query = query.where(ProfileRow.id != exclude_id)
    return int(session.scalar(query) or 0)


def count_profiles_by_status(session: Session) -> dict[str, int]:
    """Profiles per status over all tenants (for /metrics)."""
    rows = session.execute(select(ProfileRow.status, func.count()).group_by(ProfileRow.status)).all()
    counts = {status: 0 for status in PROFILE_STATUSES}
    counts.update({status: int(n) for status, n in rows})
    return counts


# --- worker-side helpers: a task carries only the profile id ---

def profile_by_id(session: Session, profile_id: str) -> ProfileRow | None:
    """A profile by id without a tenant (worker tasks only; never call this from a request handler)."""
    return session.get(ProfileRow, profile_id)


def profile_items(session: Session, row: ProfileRow) -> list[OpinionItem]:
    """The current sample of a profile's subject (what a build reads), with its contrast."""
    return profile_sample(session, row.tenant_id, row.subject_kind, row.subject_id,
                          (row.params or {}).get("contrast") or [])


def profile_sample(session: Session, tenant_id: int, kind: str, subject_id: int,
                   contrast: Sequence[dict[str, str]]) -> list[OpinionItem]:
    """A subject's items, each carrying the pooled answers of the `contrast` subjects (`{"kind", "id"}`,
    uid or gid) on the same question; no contrast: the items as they are. A contrast subject deleted since
    the request adds nothing (the sample's hash then differs from the requested one, which the build
    reports)."""
    items = subject_items(session, tenant_id, kind, subject_id)
    if not contrast:
        return items
    samples = []
    for ref in contrast:
        other = get_subject(session, tenant_id, ref["kind"], ref["id"])
        if other is not None:
            samples.append(subject_items(session, tenant_id, ref["kind"], other.id))
    return with_contrast(items, samples)


def groups_sharing_questions(session: Session, tenant_id: int, items: Sequence[OpinionItem],
                             exclude: int | None = None) -> list[str]:
    """The gids of the tenant's groups (but `exclude`) whose samples answer at least one of `items`'
    questions, sorted."""
    wanted = {question_key(it) for it in items}
    out = []
    for group in session.scalars(select(Group).where(Group.tenant_id == tenant_id).order_by(Group.gid)):
        if group.id == exclude:
            continue
        if any(question_key(it) in wanted for it in subject_items(session, tenant_id, "group", group.id)):
            out.append(group.gid)
    return out


@functools.cache
def _migration_heads() -> frozenset[str]:
    from alembic.script import ScriptDirectory

    return frozenset(ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads())


def is_current(url: str) -> bool:
    """Whether the database at `url` is migrated to the newest revision."""
    from alembic.runtime.migration import MigrationContext

    heads = _migration_heads()
    with get_engine(url).connect() as conn:
        current = set(MigrationContext.configure(conn).get_current_heads())
    return current == heads
