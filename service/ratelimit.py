"""Per-key rate limits in Redis: a fixed one-minute window per key, shared by every API process.

Past the limit a request gets 429 with `Retry-After` (seconds until the window ends). Redis is a cache
here, not a gate: when it is unreachable requests are let through (and counted in /metrics) rather than
failing the whole API.
"""

from __future__ import annotations

import logging
import math
import time

import redis

from service import context
from service.errors import ApiError
from service.redis_server import DOWN_BACKOFF_S, note_redis_error, redis_down

log = logging.getLogger(__name__)

WINDOW_S = 60
PREFIX = "pluristeer:ratelimit:"


def hit(client: redis.Redis, key_id: str, limit: int, now: float | None = None) -> tuple[bool, int, int]:
    """Count one request of `key_id`. Returns (allowed, remaining, seconds until the window resets)."""
    now = time.time() if now is None else now
    window = int(now // WINDOW_S)
    name = f"{PREFIX}{key_id}:{window}"
    pipe = client.pipeline()
    pipe.incr(name)
    pipe.expire(name, WINDOW_S + 5)
    count = int(pipe.execute()[0])
    reset = max(1, math.ceil((window + 1) * WINDOW_S - now))
    return count <= limit, max(0, limit - count), reset


def enforce(key_id: str) -> None:
    """Raise 429 when `key_id` (a key's hash: unique across databases sharing one Redis) is over the
    configured per-minute limit (0 or less: no limit)."""
    limit = context.settings().rate_limit_per_minute
    if limit <= 0:
        return
    from service.observability import record_rate_limit

    url = context.settings().redis_url
    if redis_down(url):  # a down Redis must not add a timeout to every request
        record_rate_limit("redis_unavailable")
        return
    try:
        allowed, _remaining, reset = hit(context.redis_client(), key_id, limit)
    except redis.RedisError as exc:
        note_redis_error(url)
        log.warning("rate limit not applied for %.0f s, Redis unavailable: %s", DOWN_BACKOFF_S, exc)
        record_rate_limit("redis_unavailable")
        return
    if not allowed:
        record_rate_limit("limited")
        raise ApiError(429, "rate_limited", f"more than {limit} requests per minute with this key; retry in "
                       f"{reset} s", "Authorization", {"Retry-After": str(reset)})
