"""The embedded Redis as the command line drives it: `pluristeer up` and `serve` start it before their
children (handing them its URL through `REDIS_URL`), `up` supervises and restarts it, and both stop it when
they end.

The server itself, the clients and the "Redis is down" marker live in `service.redis`: any process of the
service may start the embedded server on demand (an API process or a worker with `REDIS_URL` unset), and
nothing outside `service.cli` imports the command line. This module names what the command line uses.
"""

from __future__ import annotations

from service.redis import (
    embedded_redis_pid,
    embedded_redis_url,
    ensure_redis,
    parent_death_signal,
    restart_embedded_redis,
    stop_embedded_redis,
)

__all__ = ["embedded_redis_pid", "embedded_redis_url", "ensure_redis", "parent_death_signal",
           "restart_embedded_redis", "stop_embedded_redis"]
