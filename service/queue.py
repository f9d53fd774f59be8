"""The task queue as the API and the worker both see it: task names, queues, the Celery app's
configuration, and enqueueing. The worker imports this module; nothing in `service` imports `worker`.

A message names a task and carries ids only (JSON): `pluristeer.build_profile(profile_id)` goes to the
`gpu` queue while a GPU worker is listening for the methods that train or follow gradients (COLD-FD,
COLD-Kernel, ODESteer, LoRA: `Method.prefers_gpu`), the `cpu` queue otherwise;
`pluristeer.offline_comparison(comparison_id)` goes to `cpu` (or `gpu` while one listens). Also the queue
depth for /metrics, and `broker_since`: when the broker's current data began (a message sent before it is
gone; `service.builds` finds lost build messages with it).

Delivery is at-least-once: tasks are acknowledged after they finish (`task_acks_late`), a task whose
pool process dies is put back (`task_reject_on_worker_lost`), each process takes one message at a time,
and each task refuses to do its work twice at once (see `worker.tasks`).
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from typing import Any

import redis
from celery import Celery
from kombu import Queue

from service.redis import CONNECT_TIMEOUT_S, ensure_redis, note_redis_error, redis_client, redis_down
from service.settings import Settings

log = logging.getLogger(__name__)

QUEUES = ("cpu", "gpu")
BUILD_TASK = "pluristeer.build_profile"
OFFLINE_TASK = "pluristeer.offline_comparison"
POPULATION_TASK = "pluristeer.build_population"
# Key a GPU worker refreshes while it listens on the `gpu` queue (`choose_queue` routes by it).
QUEUE_ALIVE_KEY = "pluristeer:queue-alive:{queue}"
QUEUE_ALIVE_TTL_S = 60
# The module the worker's Celery app imports to register the tasks named above.
TASKS_MODULE = "worker.tasks"

# kombu's Redis transport keeps one list per queue and priority step; the default step has the bare name.
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)
# When the broker's current data began (`broker_since`): set before the first send to an empty Redis, gone
# with everything else when Redis restarts empty or is flushed.
BROKER_SINCE_KEY = "pluristeer:broker-since"
# A Redis that hangs (SIGSTOP, a stalled host) accepts connections and never answers: every broker and
# result-backend socket gives up after these, and a publish is tried twice at most, so sending a message
# fails within about 3 s (the row stays `queued` and the sweeper sends it again).
BROKER_SOCKET_TIMEOUT_S = 1.0
PUBLISH_RETRY_POLICY = {"max_retries": 1, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0}


class BrokerUnavailable(RuntimeError):
    """The message could not be sent. The row stays `queued`; the sweeper (builds) or the next results
    request (offline comparisons) sends it again."""


class BuildCelery(Celery):
    """A Celery app that carries the service settings its tasks read."""

    settings: Settings


def soft_time_limit(hard: int) -> int:
    """The soft limit a task sees first (to record a clean `failed`) before the hard kill."""
    return max(1, hard - max(5, min(60, hard // 10)))


def visibility_timeout(settings: Settings) -> int:
    """Seconds after which the broker hands an unacknowledged message to another worker: it must outlast the
    longest build, or a running build would be handed to a second worker."""
    return max(1, int(settings.build_time_limit)) + 600


def celery_config(settings: Settings, broker_url: str) -> dict[str, Any]:
    limit = max(1, int(settings.build_time_limit))
    return {
        "broker_url": broker_url,
        "result_backend": broker_url,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": limit,
        "task_soft_time_limit": soft_time_limit(limit),
        "task_track_started": True,
        "task_default_queue": "cpu",
        "task_queues": [Queue(name) for name in QUEUES],
        "task_create_missing_queues": False,
        "result_expires": 24 * 3600,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": CONNECT_TIMEOUT_S,
        "task_publish_retry": True,
        "task_publish_retry_policy": PUBLISH_RETRY_POLICY,
        "redis_socket_connect_timeout": CONNECT_TIMEOUT_S,
        "redis_socket_timeout": BROKER_SOCKET_TIMEOUT_S,
        # A lost worker's builds are picked up sooner than the visibility timeout by the sweeper
        # (`build_stale_after`).
        "broker_transport_options": {"visibility_timeout": visibility_timeout(settings),
                                     "socket_timeout": BROKER_SOCKET_TIMEOUT_S,
                                     "socket_connect_timeout": CONNECT_TIMEOUT_S},
        "result_backend_transport_options": {"retry_policy": {"timeout": 5.0}},
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "imports": [TASKS_MODULE],
    }


def create_celery(settings: Settings | None = None) -> BuildCelery:
    """A Celery app for `settings` (default: from the environment), broker and results in its Redis."""
    settings = settings or Settings.from_env()
    app = BuildCelery("pluristeer", set_as_current=False)
    app.settings = settings
    app.conf.update(celery_config(settings, ensure_redis(settings.redis_url)))
    return app


_apps: dict[tuple[str, str], BuildCelery] = {}
_apps_lock = threading.Lock()


def celery_for(settings: Settings) -> BuildCelery:
    """One Celery app per (Redis, database) in a process: producers reuse its connection pool. A producer
    also bounds the (re)connection a publish starts with (a worker's consumer keeps retrying instead)."""
    key = (ensure_redis(settings.redis_url), settings.database_url)
    with _apps_lock:
        app = _apps.get(key)
        if app is None:
            app = _apps[key] = create_celery(settings)
            app.conf.broker_transport_options = {**app.conf.broker_transport_options,
                                                 "max_retries": PUBLISH_RETRY_POLICY["max_retries"]}
        return app


def gpu_worker_listening(settings: Settings) -> bool:
    """True while a worker on a GPU host advertises the `gpu` queue (a key with a short TTL)."""
    try:
        return bool(redis_client(settings).exists(QUEUE_ALIVE_KEY.format(queue="gpu")))
    except redis.RedisError:
        return False


def choose_queue(method: str, settings: Settings) -> str:
    from steer_core.method_names import POPULATION_METHOD, method_entry  # torch-free (a request thread asks)

    # A fit against a population reads a few questions and trains nothing: any worker does it in seconds.
    if method != POPULATION_METHOD and method_entry(method).prefers_gpu and gpu_worker_listening(settings):
        return "gpu"
    return "cpu"


def broker_since(settings: Settings) -> datetime:
    """When the broker's current data began: the time of the first `check_broker` (so of the first send) since
    Redis started empty or was flushed. A message sent before it is gone. Raises redis errors."""
    pipe = redis_client(settings).pipeline()  # MULTI/EXEC: set it if absent and read it, in one step
    pipe.set(BROKER_SINCE_KEY, datetime.now(UTC).isoformat(), nx=True)
    pipe.get(BROKER_SINCE_KEY)
    return datetime.fromisoformat(pipe.execute()[1].decode())


def check_broker(settings: Settings, what: str) -> None:
    """Raise `BrokerUnavailable` within about a second when Redis is down or hung. Records `broker_since`
    before a message is sent, so a message in the broker is never older than it."""
    if redis_down(settings.redis_url):
        raise BrokerUnavailable(f"could not queue {what}: Redis failed moments ago")
    try:
        # kombu's own connection has no read timeout: ask Redis with the short-timeout client first.
        broker_since(settings)
    except redis.RedisError as exc:
        note_redis_error(settings.redis_url)
        raise BrokerUnavailable(f"could not queue {what}: {exc}") from exc


def send(task: str, args: list[Any], queue: str, settings: Settings, time_limit: int | None = None) -> None:
    """Send one task message to `queue` (after `check_broker`), with its own hard `time_limit` (seconds) when
    given instead of the app's. Raises `BrokerUnavailable`."""
    limits: dict[str, Any] = {} if time_limit is None else {"time_limit": time_limit,
                                                            "soft_time_limit": soft_time_limit(time_limit)}
    try:
        # The default exchange routes by queue name alone. A named exchange needs its binding table in
        # Redis, and after a Redis flush kombu drops messages published to it without a word.
        # Nothing reads a task's Celery result (the database holds its outcome): the sender does not
        # subscribe to it, which would be one more Redis call to wait on.
        celery_for(settings).send_task(task, args=args, queue=queue, exchange="", routing_key=queue,
                                       ignore_result=True, **limits)
    except Exception as exc:  # kombu raises its own OperationalError, redis its ConnectionError
        raise BrokerUnavailable(f"could not queue {task}({', '.join(map(str, args))}): {exc}") from exc
    log.info("queued %s%s on %s", task, args, queue)


def enqueue_build(profile_id: str, method: str, settings: Settings) -> None:
    """Send the build of `profile_id` (its row must already be committed). Raises `BrokerUnavailable`
    within about a second when Redis is down or hung: the row stays queued and is sent again later."""
    check_broker(settings, f"the build of profile {profile_id}")
    send(BUILD_TASK, [profile_id], choose_queue(method, settings), settings)


def enqueue_offline_comparison(comparison_id: str, settings: Settings) -> None:
    """Send the offline comparison `comparison_id` (its row must already be committed). It runs the model,
    so it goes where the models are: the `gpu` queue while a GPU worker listens. Raises `BrokerUnavailable`."""
    check_broker(settings, f"the offline comparison {comparison_id}")
    send(OFFLINE_TASK, [comparison_id], "gpu" if gpu_worker_listening(settings) else "cpu", settings)


def enqueue_population(population_id: str, settings: Settings) -> None:
    """Send `pluristeer.build_population(population_id)`: many reads of the model, so to the `gpu` queue while
    a GPU worker listens. Raises `BrokerUnavailable`."""
    check_broker(settings, f"the population {population_id}")
    send(POPULATION_TASK, [population_id], "gpu" if gpu_worker_listening(settings) else "cpu", settings,
         time_limit=settings.population_time_limit)


def queue_depths(settings: Settings) -> dict[str, int]:
    """Messages waiting in each queue (not counting ones a worker holds). Raises redis errors."""
    client = redis_client(settings)
    pipe = client.pipeline()
    for queue in QUEUES:
        pipe.llen(queue)
        for step in _PRIORITY_STEPS:
            pipe.llen(f"{queue}{_PRIORITY_SEP}{step}")
    counts = pipe.execute()
    per = 1 + len(_PRIORITY_STEPS)
    return {queue: int(sum(counts[i * per:(i + 1) * per])) for i, queue in enumerate(QUEUES)}
