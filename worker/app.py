"""The worker's Celery app: `celery -A worker.app worker -Q cpu` finds the module-level `app` (built on
first access from the environment, so importing this module starts nothing). `pluristeer worker` calls
`run_worker(args)`. Task names, queues and the app's configuration live in `service.queue`, which the API
shares; what each pool process does besides running tasks lives in `worker.lifecycle`.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from service.queue import QUEUES, BuildCelery, create_celery
from service.settings import Settings
from worker import lifecycle

log = logging.getLogger(__name__)

_module_app: BuildCelery | None = None


def __getattr__(name: str) -> Any:
    # `celery -A worker.app` reads `worker.app.app`: build it on first access, not at import.
    global _module_app
    if name in ("app", "celery"):
        if _module_app is None:
            _module_app = create_celery(Settings.from_env())
        return _module_app
    raise AttributeError(name)


def default_queues() -> list[str]:
    """A worker on a GPU host serves both queues; elsewhere only `cpu`."""
    return ["gpu", "cpu"] if lifecycle.gpu_available() else ["cpu"]


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
