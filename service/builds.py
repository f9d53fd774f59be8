"""Sending profile builds to the workers: the `gpu` queue for methods that need one when a GPU worker
is listening, the `cpu` queue otherwise. Also the queue depth for /metrics.

The API needs no worker code for this: a build is a message naming the task and the profile id.
"""

from __future__ import annotations

import logging

import redis

from service.redis_server import redis_client
from service.settings import Settings
from worker.app import BUILD_TASK, QUEUE_ALIVE_KEY, QUEUES, celery_for

log = logging.getLogger(__name__)

# kombu's Redis transport keeps one list per queue and priority step; the default step has the bare name.
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)


class BrokerUnavailable(RuntimeError):
    """The build message could not be sent. The row stays `queued`; the sweeper sends it again later."""


def gpu_worker_listening(settings: Settings) -> bool:
    """True while a worker on a GPU host advertises the `gpu` queue (a key with a short TTL)."""
    try:
        return bool(redis_client(settings).exists(QUEUE_ALIVE_KEY.format(queue="gpu")))
    except redis.RedisError:
        return False


def choose_queue(method: str, settings: Settings) -> str:
    from steer_core.methods import get_method

    if get_method(method).needs_gpu and gpu_worker_listening(settings):
        return "gpu"
    return "cpu"


def enqueue_build(profile_id: str, method: str, settings: Settings) -> None:
    """Send the build of `profile_id` (its row must already be committed). Raises `BrokerUnavailable`
    within about a second when Redis is down or hung: the row stays queued and is sent again later."""
    from service.redis_server import note_redis_error, redis_down

    if redis_down(settings.redis_url):
        raise BrokerUnavailable(f"could not queue the build of profile {profile_id}: Redis failed moments ago")
    try:
        # kombu's own connection has no read timeout: ask Redis with the short-timeout client first.
        redis_client(settings).ping()
    except redis.RedisError as exc:
        note_redis_error(settings.redis_url)
        raise BrokerUnavailable(f"could not queue the build of profile {profile_id}: {exc}") from exc
    queue = choose_queue(method, settings)
    try:
        # The default exchange routes by queue name alone. A named exchange needs its binding table in
        # Redis, and after a Redis flush kombu drops messages published to it without a word.
        celery_for(settings).send_task(
            BUILD_TASK, args=[profile_id], queue=queue, exchange="", routing_key=queue,
            retry=True, retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5,
                                      "interval_max": 1.0})
    except Exception as exc:  # kombu raises its own OperationalError, redis its ConnectionError
        raise BrokerUnavailable(f"could not queue the build of profile {profile_id}: {exc}") from exc
    log.info("queued build of profile %s on %s", profile_id, queue)


def queue_depths(settings: Settings) -> dict[str, int]:
    """Messages waiting in each build queue (not counting ones a worker holds). Raises redis errors."""
    client = redis_client(settings)
    pipe = client.pipeline()
    for queue in QUEUES:
        pipe.llen(queue)
        for step in _PRIORITY_STEPS:
            pipe.llen(f"{queue}{_PRIORITY_SEP}{step}")
    counts = pipe.execute()
    per = 1 + len(_PRIORITY_STEPS)
    return {queue: int(sum(counts[i * per:(i + 1) * per])) for i, queue in enumerate(QUEUES)}
