"""Rate limits in Redis: a fixed one-minute window per key (`RATE_LIMIT_PER_MINUTE`) and one per tenant, all
its keys together (`TENANT_RATE_LIMIT_PER_MINUTE`: more keys do not multiply a tenant's limit), shared by
every API process.

Past the limit a request gets 429 with `Retry-After` (seconds until the window ends). Redis is a cache
here, not a gate: when it is unreachable requests are let through (and counted in /metrics) rather than
failing the whole API.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time

import redis

from service import context
from service.api.errors import ApiError
from service.redis import DOWN_BACKOFF_S, note_redis_error, redis_down

log = logging.getLogger(__name__)

WINDOW_S = 60
PREFIX = "pluristeer:ratelimit:"
TENANT_PREFIX = "pluristeer:ratelimit:tenant:"
TOKEN_PREFIX = "pluristeer:tokens:"


def hit(client: redis.Redis, key_id: str, limit: int, now: float | None = None, amount: int = 1,
        prefix: str = PREFIX) -> tuple[bool, int, int]:
    """Count `amount` (one request, or tokens) against `key_id`'s window. Returns (allowed, remaining, seconds
    until the window resets). A refused amount is not counted, so a smaller request may still pass."""
    now = time.time() if now is None else now
    window = int(now // WINDOW_S)
    name = f"{prefix}{key_id}:{window}"
    pipe = client.pipeline()
    pipe.incrby(name, amount)
    pipe.expire(name, WINDOW_S + 5)
    count = int(pipe.execute()[0])
    reset = max(1, math.ceil((window + 1) * WINDOW_S - now))
    if count > limit and amount > 1:
        client.decrby(name, amount)
        count -= amount
        return False, max(0, limit - count), reset
    return count <= limit, max(0, limit - count), reset


def tenant_key(tenant_id: int) -> str:
    """A tenant's name in Redis. Tenant ids are per database: the database's URL keeps two deployments on one
    Redis apart."""
    return hashlib.sha256(f"{context.settings().database_url}|{tenant_id}".encode()).hexdigest()[:32]


def charge_tokens(tenant_id: int, tokens: int) -> None:
    """Count a generation's prompt plus requested new tokens against its tenant's per-minute budget
    (`TOKENS_PER_MINUTE`; 0 or less: none); 429 with `Retry-After` past it. Like the request limit, it lets
    requests through while Redis is unavailable."""
    settings = context.settings()
    limit = settings.tokens_per_minute
    if limit <= 0:
        return
    from service.observability import record_rate_limit

    if redis_down(settings.redis_url):
        record_rate_limit("redis_unavailable")
        return
    try:
        allowed, remaining, reset = hit(context.redis_client(), tenant_key(tenant_id), limit, amount=tokens,
                                        prefix=TOKEN_PREFIX)
    except redis.RedisError as exc:
        note_redis_error(settings.redis_url)
        log.warning("token budget not applied for %.0f s, Redis unavailable: %s", DOWN_BACKOFF_S, exc)
        record_rate_limit("redis_unavailable")
        return
    if not allowed:
        record_rate_limit("token_budget")
        raise ApiError(429, "token_budget", f"this request needs {tokens} tokens (prompt plus max_tokens) and "
                       f"{remaining} of this tenant's {limit} a minute are left; retry in {reset} s or ask for "
                       "fewer", "max_tokens", {"Retry-After": str(reset)})


def enforce(key_id: str, tenant_id: int | None = None) -> None:
    """Raise 429 when `key_id` (a key's hash: unique across databases sharing one Redis) is over the per-key
    limit, or its tenant `tenant_id` over the per-tenant one (each: 0 or less, no limit). A request refused by
    its key's limit is not counted against its tenant's."""
    settings = context.settings()
    limits = [(PREFIX, key_id, settings.rate_limit_per_minute)]
    if tenant_id is not None:
        limits.append((TENANT_PREFIX, tenant_key(tenant_id), settings.tenant_rate_limit()))
    limits = [limit for limit in limits if limit[2] > 0]
    if not limits:
        return
    from service.observability import record_rate_limit

    url = settings.redis_url
    if redis_down(url):  # a down Redis must not add a timeout to every request
        record_rate_limit("redis_unavailable")
        return
    for prefix, name, limit in limits:
        try:
            allowed, _remaining, reset = hit(context.redis_client(), name, limit, prefix=prefix)
        except redis.RedisError as exc:
            note_redis_error(url)
            log.warning("rate limit not applied for %.0f s, Redis unavailable: %s", DOWN_BACKOFF_S, exc)
            record_rate_limit("redis_unavailable")
            return
        if allowed:
            continue
        if prefix == PREFIX:
            record_rate_limit("limited")
            raise ApiError(429, "rate_limited", f"more than {limit} requests per minute with this key; retry in "
                           f"{reset} s", "Authorization", {"Retry-After": str(reset)})
        record_rate_limit("tenant_limited")
        raise ApiError(429, "rate_limited", f"more than {limit} requests per minute from this tenant, all its keys "
                       f"together (TENANT_RATE_LIMIT_PER_MINUTE); retry in {reset} s", "Authorization",
                       {"Retry-After": str(reset)})
