"""The Celery app for profile builds: created from the service's settings, Redis broker, JSON only.

`celery -A worker.app worker -Q cpu` finds the module-level `app` (built on first access from the
environment, so importing this module starts nothing). `pluristeer worker` calls `run_worker(args)`.

Delivery is at-least-once: tasks are acknowledged after they finish (`task_acks_late`), a task whose
pool process dies is put back (`task_reject_on_worker_lost`), each process takes one message at a time,
and the build task itself refuses to run twice at once for one profile (see `worker.tasks`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

from celery import Celery, signals
from kombu import Queue

from service.settings import Settings

log = logging.getLogger(__name__)

QUEUES = ("cpu", "gpu")
BUILD_TASK = "pluristeer.build_profile"
SWEEP_TASK = "pluristeer.sweep"
# Key a GPU worker refreshes while it listens on the `gpu` queue (`service.builds` routes by it).
QUEUE_ALIVE_KEY = "pluristeer:queue-alive:{queue}"
QUEUE_ALIVE_TTL_S = 60


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
        # An unacknowledged message is redelivered after this long: it must outlast the longest build, or a
        # running build would be handed to a second worker. A lost worker's builds are picked up sooner by
        # the sweeper (`build_stale_after`).
        "broker_transport_options": {"visibility_timeout": limit + 600},
        "result_backend_transport_options": {"retry_policy": {"timeout": 5.0}},
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "imports": ["worker.tasks"],
    }


def create_celery(settings: Settings | None = None) -> BuildCelery:
    """A Celery app for `settings` (default: from the environment), broker and results in its Redis."""
    from service.redis_server import ensure_redis

    settings = settings or Settings.from_env()
    app = BuildCelery("pluristeer", set_as_current=False)
    app.settings = settings
    app.conf.update(celery_config(settings, ensure_redis(settings.redis_url)))
    return app


_apps: dict[tuple[str, str], BuildCelery] = {}
_apps_lock = threading.Lock()


def celery_for(settings: Settings) -> BuildCelery:
    """One Celery app per (Redis, database) in a process: producers reuse its connection pool."""
    from service.redis_server import ensure_redis

    key = (ensure_redis(settings.redis_url), settings.database_url)
    with _apps_lock:
        app = _apps.get(key)
        if app is None:
            app = _apps[key] = create_celery(settings)
        return app


_module_app: BuildCelery | None = None


def __getattr__(name: str) -> Any:
    # `celery -A worker.app` reads `worker.app.app`: build it on first access, not at import.
    global _module_app
    if name in ("app", "celery"):
        if _module_app is None:
            _module_app = create_celery(Settings.from_env())
        return _module_app
    raise AttributeError(name)


def gpu_available() -> bool:
    """Whether this host has a usable GPU, asked without initialising CUDA in this process: the prefork
    pool forks after this, and a child cannot use CUDA once its parent has initialised it."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - a broken CUDA setup means no GPU
        return False


def default_queues() -> list[str]:
    """A worker on a GPU host serves both queues; elsewhere only `cpu`."""
    return ["gpu", "cpu"] if gpu_available() else ["cpu"]


def parse_queues(raw: str | None) -> list[str]:
    if not raw:
        return default_queues()
    queues = [q.strip() for q in raw.split(",") if q.strip()]
    unknown = [q for q in queues if q not in QUEUES]
    if unknown or not queues:
        raise ValueError(f"--queues: unknown queue {unknown[0] if unknown else raw!r}; use cpu and/or gpu")
    return queues


def run_worker(args: Any) -> int:
    """`pluristeer worker [--queues cpu,gpu] [--concurrency N] [--loglevel L] [--hostname H]`.

    Needs `REDIS_URL` (the broker the API enqueues on) and the API's `DATABASE_URL` / `ARTIFACT_DIR`;
    `pluristeer up` sets them for the worker it starts.
    """
    import sys

    settings = Settings.from_env()
    if not settings.redis_url:
        print("error: REDIS_URL is not set: a worker must share the API's Redis (run `pluristeer up` for a "
              "one-machine stack, or set REDIS_URL)", file=sys.stderr)
        return 2
    try:
        queues = parse_queues(getattr(args, "queues", None))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    concurrency = int(getattr(args, "concurrency", None) or 1)
    loglevel = getattr(args, "loglevel", None) or "INFO"
    hostname = (getattr(args, "hostname", None)
                or f"pluristeer-{'-'.join(queues)}-{os.getpid()}@{socket.gethostname()}")
    app = create_celery(settings)
    argv = ["worker", "--queues", ",".join(queues), "--concurrency", str(concurrency), "--pool", "prefork",
            "--loglevel", loglevel, "--hostname", hostname, "--without-gossip", "--without-mingle",
            "--without-heartbeat"]
    app.worker_main(argv=argv)
    return 0


# ---------------------------------------------------------------------------------------------------------
# Worker process lifecycle: the pool process loads the model once, sweeps stale builds and, on a GPU
# host, advertises the `gpu` queue.

_listening: list[str] = []
_worker_app: list[BuildCelery] = []


def worker_settings() -> Settings:
    """The settings of the Celery app this worker process runs (the environment's, outside a worker)."""
    if _worker_app and isinstance(getattr(_worker_app[0], "settings", None), Settings):
        return _worker_app[0].settings
    return Settings.from_env()


@signals.celeryd_after_setup.connect
def _remember_worker(sender: Any = None, instance: Any = None, conf: Any = None, **_: Any) -> None:
    _worker_app[:] = [instance.app]
    try:
        _listening[:] = [q.name for q in instance.app.amqp.queues.consume_from.values()]
    except Exception:  # noqa: BLE001 - only used for the GPU advertisement
        _listening[:] = []


@signals.worker_process_init.connect
def _pool_process_started(**_: Any) -> None:
    from service.db import dispose_engines

    # Connections inherited over fork belong to the parent.
    dispose_engines()
    from worker import tasks

    tasks.start_background(worker_settings(), listening=list(_listening))
