"""What a worker process does besides running tasks: it loads the model once and keeps it, refreshes the
heartbeat of the build it runs, sweeps stale builds, advertises the `gpu` queue on a GPU host, and warms
the model at start so the first task does not pay for it.

The Celery signals below connect when this module is imported (`worker.app` imports it).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis
from celery import signals

from service import builds
from service.queue import QUEUE_ALIVE_KEY, QUEUE_ALIVE_TTL_S, BuildCelery
from service.settings import Settings

log = logging.getLogger(__name__)

_listening: list[str] = []
_worker_app: list[BuildCelery] = []

_model_lock = threading.Lock()
_models: dict[str, Any] = {}


def gpu_available() -> bool:
    """Whether this host has a usable GPU, asked without initialising CUDA in this process: the prefork
    pool forks after this, and a child cannot use CUDA once its parent has initialised it."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - a broken CUDA setup means no GPU
        return False


def worker_settings() -> Settings:
    """The settings of the Celery app this worker process runs (the environment's, outside a worker)."""
    if _worker_app and isinstance(getattr(_worker_app[0], "settings", None), Settings):
        return _worker_app[0].settings
    return Settings.from_env()


def get_model(name: str) -> Any:
    """The process's model (loaded on first use, then reused by every task of this process)."""
    with _model_lock:
        lm = _models.get(name)
        if lm is None:
            from steer_core.models import load_model

            log.info("loading model %s", name)
            lm = _models[name] = load_model(name)
        return lm


@contextmanager
def heartbeat(settings: Settings, profile_id: str,
              refresh: Callable[[Settings, str], None] = builds.heartbeat) -> Iterator[None]:
    """Refresh the row's heartbeat (`refresh`: a profile's by default, `service.populations.heartbeat` for a
    population) while the build runs, so no one takes a live build over."""
    stop = threading.Event()
    interval = max(0.5, min(30.0, settings.build_stale_after / 4))

    def beat() -> None:
        while not stop.wait(interval):
            try:
                refresh(settings, profile_id)
            except Exception as exc:  # noqa: BLE001 - a missed beat is retried at the next interval
                log.warning("heartbeat of %s failed: %s", profile_id, exc)

    thread = threading.Thread(target=beat, name=f"heartbeat-{profile_id[:8]}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


@signals.celeryd_after_setup.connect
def _remember_worker(sender: Any = None, instance: Any = None, conf: Any = None, **_: Any) -> None:
    _worker_app[:] = [instance.app]
    try:
        _listening[:] = [q.name for q in instance.app.amqp.queues.consume_from.values()]
    except Exception:  # noqa: BLE001 - only used for the GPU advertisement
        _listening[:] = []


@signals.worker_process_init.connect
def _pool_process_started(**_: Any) -> None:
    from service.store.db import dispose_engines

    # Connections inherited over fork belong to the parent.
    dispose_engines()
    start_background(worker_settings(), listening=list(_listening))


_background_started = threading.Event()


def start_background(settings: Settings, listening: list[str]) -> threading.Thread | None:
    """Start (once per process) the thread that sweeps (`service.builds.sweep`) at start and then every
    `sweep_interval`."""
    if _background_started.is_set():
        return None
    _background_started.set()
    thread = threading.Thread(target=_background_loop, args=(settings, listening), name="pluristeer-sweeper",
                              daemon=True)
    thread.start()
    return thread


def _background_loop(settings: Settings, listening: list[str]) -> None:
    from service.redis import redis_client

    advertise = "gpu" in listening and gpu_available()
    interval = builds.sweep_interval(settings)
    stop = threading.Event()
    # Warm the model so the first task does not pay for it; a task that comes first waits on the lock.
    threading.Thread(target=_warm_model, args=(settings,), name="pluristeer-model", daemon=True).start()
    while True:
        if advertise:
            try:
                redis_client(settings).set(QUEUE_ALIVE_KEY.format(queue="gpu"), socket.gethostname(),
                                           ex=QUEUE_ALIVE_TTL_S)
            except redis.RedisError as exc:
                log.warning("could not advertise the gpu queue: %s", exc)
        try:
            builds.sweep(settings)
        except Exception as exc:  # noqa: BLE001 - try again at the next interval
            log.warning("sweep failed: %s", exc)
        stop.wait(min(interval, QUEUE_ALIVE_TTL_S / 3) if advertise else interval)


def _warm_model(settings: Settings) -> None:
    try:
        get_model(settings.model)
    except Exception as exc:  # noqa: BLE001 - the task reports the load error to the user
        log.warning("could not preload model %s: %s", settings.model, exc)
