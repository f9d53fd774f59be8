"""The task queue as the API and the worker both see it: task names, queues, the Celery app's
configuration, and enqueueing. The worker imports this module; nothing in `service` imports `worker`.

A message names a task and carries ids only (JSON): `pluristeer.build_profile(profile_id)` goes to the
`gpu` queue while a GPU worker is listening for the methods that train or follow gradients (COLD-FD,
COLD-Kernel, ODESteer, LoRA: `Method.prefers_gpu`), the `cpu` queue otherwise;
`pluristeer.offline_comparison(comparison_id)` goes to `cpu` (or `gpu` while one listens). Also the queue
depth for /metrics.

Delivery is at-least-once: tasks are acknowledged after they finish (`task_acks_late`), a task whose
pool process dies is put back (`task_reject_on_worker_lost`), each process takes one message at a time,
and each task refuses to do its work twice at once (see `worker.tasks`).
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

import redis
from celery import Celery
from kombu import Queue

from service.cli.redis_server import CONNECT_TIMEOUT_S, ensure_redis, redis_client
from service.settings import Settings

log = logging.getLogger(__name__)

QUEUES = ("cpu", "gpu")
BUILD_TASK = "pluristeer.build_profile"
OFFLINE_TASK = "pluristeer.offline_comparison"
# Key a GPU worker refreshes while it listens on the `gpu` queue (`choose_queue` routes by it).
QUEUE_ALIVE_KEY = "pluristeer:queue-alive:{queue}"
QUEUE_ALIVE_TTL_S = 60
# The module the worker's Celery app imports to register the tasks named above.
TASKS_MODULE = "worker.tasks"

# kombu's Redis transport keeps one list per queue and priority step; the default step has the bare name.
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)
# A queued row this old with no message in the broker has lost it (the sweeper sends it again).
RESEND_QUEUED_AFTER_S = 30.0
# Messages a worker has taken but not acknowledged (acks late: until the task ends).
_UNACKED = "unacked"
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
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
        # An unacknowledged message is redelivered after this long: it must outlast the longest build, or a
        # running build would be handed to a second worker. A lost worker's builds are picked up sooner by
        # the sweeper (`build_stale_after`).
        "broker_transport_options": {"visibility_timeout": limit + 600, "socket_timeout": BROKER_SOCKET_TIMEOUT_S,
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
    from steer_core.methods import get_method

    if get_method(method).prefers_gpu and gpu_worker_listening(settings):
        return "gpu"
    return "cpu"


def check_broker(settings: Settings, what: str) -> None:
    """Raise `BrokerUnavailable` within about a second when Redis is down or hung."""
    from service.cli.redis_server import note_redis_error, redis_down

    if redis_down(settings.redis_url):
        raise BrokerUnavailable(f"could not queue {what}: Redis failed moments ago")
    try:
        # kombu's own connection has no read timeout: ask Redis with the short-timeout client first.
        redis_client(settings).ping()
    except redis.RedisError as exc:
        note_redis_error(settings.redis_url)
        raise BrokerUnavailable(f"could not queue {what}: {exc}") from exc


def send(task: str, args: list[Any], queue: str, settings: Settings) -> None:
    """Send one task message to `queue` (after `check_broker`). Raises `BrokerUnavailable`."""
    try:
        # The default exchange routes by queue name alone. A named exchange needs its binding table in
        # Redis, and after a Redis flush kombu drops messages published to it without a word.
        # Nothing reads a task's Celery result (the database holds its outcome): the sender does not
        # subscribe to it, which would be one more Redis call to wait on.
        celery_for(settings).send_task(task, args=args, queue=queue, exchange="", routing_key=queue,
                                       ignore_result=True)
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


def pending_builds(settings: Settings) -> set[str]:
    """Ids of the profiles whose build message is in the broker: waiting in a queue or held by a worker
    (kombu's `unacked` hash). A `queued` row missing here has lost its message. Raises redis errors."""
    client = redis_client(settings)
    pipe = client.pipeline()
    for queue in QUEUES:
        pipe.lrange(queue, 0, -1)
        for step in _PRIORITY_STEPS:
            pipe.lrange(f"{queue}{_PRIORITY_SEP}{step}", 0, -1)
    pipe.hvals(_UNACKED)
    found: set[str] = set()
    for messages in pipe.execute():
        for raw in messages:
            # A message's headers carry its arguments as text (`argsrepr`): the profile id appears as is.
            found.update(_UUID.findall(raw.decode("utf-8", "replace")))
    return found


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
