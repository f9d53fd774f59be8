"""The engine as request threads see it, and all that routes (`service.api`, `service.console`) import from
`service.engine`. Torch-free: importing it loads neither torch nor transformers, and neither does anything a
request thread calls here.

`EngineClient` is a process's handle on its engine: it creates the concrete engine
(`service.engine.engine.GenerationEngine`, imported here only when the first request needs it) with the
served model, admits at most `MAX_BATCH_SIZE` engine-bound requests at once, and stops it. What routes
call on the engine is the `Engine` protocol: tokenizing, `submit` (a generation's `GenerationHandle`) and
`score`, all in the plain types of `service.engine.types`.

The other tensor work of the API runs on the engine's side too, on the client's tools thread
(`service.engine.tools`), which needs no model loaded: exporting a profile (GGUF, peft) and importing a
tenant's adapter. The request thread hands over bytes and plain data and waits for bytes and plain data.

A server process (`service.wsgi`) calls `start_loading` once its app is created: the model is fetched and
converted (the default model, once per `PLURISTEER_HOME`) and loaded on a background thread; until the
engine can serve, engine-bound requests are refused at once (503 with Retry-After) and `/readyz` says
"loading", while `/healthz` and the other routes answer as usual.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from service.engine.blend import CalibratedBlend, calibrate_blend
from service.engine.types import (
    FINISH_REASONS,
    INVALID,
    MAX_TOP_LOGPROBS,
    MODEL_MISMATCH,
    UNAVAILABLE,
    AppliedProfile,
    DeadlineExceeded,
    EngineBusy,
    EngineError,
    EngineStats,
    EngineStopped,
    EngineUnavailable,
    GenerationFailed,
    GenerationHandle,
    GenerationResult,
    ImportedAdapter,
    PlannedProfile,
    SamplingParams,
    Scored,
    SteeringPlan,
    SteeringRejected,
    TextChunk,
    TokenLogprob,
)
from steer_core.data import OpinionItem
from steer_core.errors import SteerError

if TYPE_CHECKING:
    from flask import Flask

    from service.engine.metrics import EngineCollector
    from service.settings import Settings

__all__ = ["ENGINE", "FINISH_REASONS", "INVALID", "MAX_TOP_LOGPROBS", "MODEL_MISMATCH", "REQUEST_TIMEOUT_S",
           "UNAVAILABLE", "AppliedProfile", "CalibratedBlend", "DeadlineExceeded", "Engine", "EngineBusy",
           "EngineClient", "EngineError", "EngineStats", "EngineStopped", "EngineUnavailable", "GenerationFailed",
           "GenerationHandle", "GenerationResult", "ImportedAdapter", "PlannedProfile", "SamplingParams", "Scored",
           "SteeringPlan", "SteeringRejected", "TextChunk", "TokenLogprob", "calibrate_blend", "engine_client"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# The app extension that holds the process's `EngineClient`.
ENGINE = "pluristeer.engine"
# Seconds a request may take from submission to its last token; past it the engine drops the row and the
# client gets 503 with Retry-After.
REQUEST_TIMEOUT_S = 300.0
# Threads that run exports and imports (`service.engine.tools`) for the process.
TOOL_THREADS = 2
# A request refused while the model loads at start-up is told to come back after this many seconds.
LOADING_RETRY_AFTER_S = 5
# After a failed start-up load, a request starts another attempt at most this often (seconds).
LOAD_RETRY_S = 30.0


class Engine(Protocol):
    """What request threads call on the process's engine."""

    context_length: int  # tokens the model attends to, prompt and generated
    max_queue: int
    stats: EngineStats

    @property
    def running(self) -> bool: ...

    def queue_depth(self) -> int: ...

    def tokenize_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]: ...

    def score_prompt_tokens(self, item: OpinionItem) -> int: ...

    def token_bytes(self, tokens: Sequence[int]) -> list[bytes]: ...

    def submit(self, prompt_ids: Sequence[int], sampling: SamplingParams, plan: SteeringPlan | None = None,
               timeout: float | None = None) -> GenerationHandle: ...

    def generate(self, prompt_ids: Sequence[int], sampling: SamplingParams, plan: SteeringPlan | None = None,
                 timeout: float | None = None) -> GenerationResult: ...

    def score(self, items: Sequence[OpinionItem], plan: SteeringPlan | Sequence[SteeringPlan | None] | None = None,
              timeout: float | None = None) -> Scored: ...

    def stop(self, timeout: float = 30.0) -> bool: ...


class EngineClient:
    """A process's generation engine, created by the first request that needs it (loading the model), and
    the thread its exports and imports run on.

    `profiles` loads a profile by its artifact digest (the engine thread calls it); `served` gives the model
    handed to the app, if any (None: the engine loads `settings.model`).

    A stop that cannot end the engine's thread (stuck in a model call) leaves the client dead: no second
    engine may start on the same model while the first one may still run it.
    """

    def __init__(self, settings: Settings, profiles: Callable[[str], Any],
                 served: Callable[[], Any] = lambda: None) -> None:
        self.settings = settings
        self._profiles = profiles
        self._served = served
        self.lock = threading.Lock()
        self.engine: Engine | None = None
        self.error: str | None = None
        self.dead: str | None = None
        self.admission_limit = settings.max_batch_size
        self._admission = threading.BoundedSemaphore(self.admission_limit)
        self.refused = 0
        self._tools: ThreadPoolExecutor | None = None
        self._tools_lock = threading.Lock()  # apart from `lock`: an export never waits for a model to load
        # Loading in the background (`start_loading`): the loader thread, since when it runs, when the last
        # attempt failed; `_epoch` moves on at each stop, so a load that ends after a stop is dropped.
        self._background = False
        self._loader: threading.Thread | None = None
        self._loading_since: float | None = None
        self._failed_at: float | None = None
        self._epoch = 0

    # ---- the engine ----------------------------------------------------------------------------------

    def admit(self) -> Callable[[], None]:
        """Take one of the process's engine-bound request slots or refuse at once (`EngineUnavailable`,
        retry after a second): a request thread past them would only wait for the engine, and the request
        threads left over (FREE_REQUEST_THREADS) must stay free for /healthz, /readyz and the routes that do
        not generate. Returns the release (safe to call twice)."""
        if not self._admission.acquire(blocking=False):
            with self.lock:
                self.refused += 1
            raise EngineUnavailable(f"{self.admission_limit} generation requests are already in flight in this "
                                    "process (MAX_BATCH_SIZE); retry shortly", retry_after=1)
        released = threading.Event()

        def release() -> None:
            if not released.is_set():
                released.set()
                self._admission.release()

        return release

    def start_loading(self) -> bool:
        """Load the model and start the engine on a background thread, now (a server process at start-up):
        fetching and converting the default model on a fresh home, then loading it, without holding any
        request thread. Until the engine runs, `get()` refuses at once (`EngineUnavailable`, retry after
        `LOADING_RETRY_AFTER_S`) and `probe()` reports the load. False when an engine already runs or a load
        is under way."""
        with self.lock:
            self._background = True
            if self.dead is not None or self.engine is not None or self._loader is not None:
                return False
            self._spawn_loader_locked()
            return True

    def _spawn_loader_locked(self) -> None:
        self._loading_since = time.monotonic()
        self._loader = threading.Thread(target=self._load_in_background, args=(self._epoch,), name="engine-loader",
                                        daemon=True)
        self._loader.start()

    def _load_in_background(self, epoch: int) -> None:
        started = time.monotonic()
        engine: Engine | None = None
        error: str | None = None
        try:
            engine = self._new_engine()
        except SteerError as exc:
            error = f"cannot load {self.settings.model!r}: {exc.message}"
        except Exception as exc:  # noqa: BLE001 - reported by /readyz and by every refused request
            log.exception("loading the model failed")
            error = f"cannot load {self.settings.model!r}: {type(exc).__name__}: {exc}"
        with self.lock:
            self._loader, self._loading_since = None, None
            if epoch != self._epoch or self.dead is not None:  # stopped meanwhile: this engine is not wanted
                if engine is not None:
                    engine.stop(5.0)
                return
            if engine is None:
                self.error, self._failed_at = error, time.monotonic()
                log.error("%s", error)
                return
            self.engine, self.error, self._failed_at = engine, None, None
        log.info("model %s loaded in %.1f s; the engine serves", self.settings.model, time.monotonic() - started)

    def _new_engine(self) -> Engine:
        """A started engine on the served model (loading it takes seconds; a fetch and a conversion first on a
        fresh home)."""
        from service.engine.engine import GenerationEngine

        settings = self.settings
        lm = self._served() or _load(settings.model)
        return GenerationEngine(
            lm, profiles=self._profiles,
            max_batch_size=settings.max_batch_size, batch_wait_ms=settings.batch_wait_ms,
            max_new_tokens=settings.max_new_tokens, max_queue=4 * settings.max_batch_size,
            request_timeout_s=REQUEST_TIMEOUT_S, cache_size=max(1, settings.profile_lru_size)).start()

    def loading_for(self) -> float | None:
        """Seconds the background load has run so far, or None when none runs."""
        since = self._loading_since
        return None if since is None else time.monotonic() - since

    def get(self) -> Engine:
        """The engine, started on first use; `EngineUnavailable` when the model cannot be loaded or the
        client is dead. After `start_loading` it never loads on the request's thread: while the model loads
        it refuses at once (retry after `LOADING_RETRY_AFTER_S`), and after a failed load it starts another
        attempt (at most every `LOAD_RETRY_S`) and refuses with the failure."""
        with self.lock:
            if self.dead is not None:
                raise EngineUnavailable(self.dead, retry_after=60)
            if self.engine is not None:
                return self.engine
            if self._background:
                failed_at = self._failed_at
                if self._loader is None and (failed_at is None or time.monotonic() - failed_at >= LOAD_RETRY_S):
                    self._spawn_loader_locked()
                if self._loader is not None:
                    raise EngineUnavailable(
                        f"the model {self.settings.model} is still loading ({_loading_phase(self.settings.model)}, "
                        f"{self.loading_for() or 0.0:.0f} s so far); retry shortly", retry_after=LOADING_RETRY_AFTER_S)
                raise EngineUnavailable(self.error or "the model is not loaded", "model", retry_after=int(LOAD_RETRY_S))
            try:
                self.engine = self._new_engine()
            except SteerError as exc:
                self.error = f"cannot load {self.settings.model!r}: {exc.message}"
                raise EngineUnavailable(self.error, "model") from None
            self.error = None
            return self.engine

    def probe(self) -> dict[str, Any]:
        """The readiness probe's view: whether an engine runs, whether the model is loading (`loading`: the
        seconds so far and what it does), and why not."""
        engine = self.engine
        loading = self.loading_for() if self.dead is None else None
        return {"loaded": self.dead is None and engine is not None and engine.running,
                "loading": None if loading is None else {"seconds": round(loading, 1),
                                                         "phase": _loading_phase(self.settings.model)},
                "error": self.dead or self.error}

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the engine (and the tools thread); False (and the client dead) when the engine's thread did
        not end in time."""
        with self._tools_lock:
            tools, self._tools = self._tools, None
        if tools is not None:
            tools.shutdown(wait=False)
        with self.lock:
            self._epoch += 1  # a load under way ends unused
            if self.engine is None:
                return True
            if not self.engine.stop(timeout):
                self.dead = ("the generation engine could not be stopped (a model call did not return); "
                             "restart the process")
                log.error(self.dead)
                return False
            self.engine = None
            return True

    def collector(self) -> EngineCollector:
        """A Prometheus collector of the engine's counters."""
        from service.engine.metrics import EngineCollector

        return EngineCollector(self)

    # ---- exports and imports, on the tools thread ----------------------------------------------------

    def _on_tools_thread(self, work: Callable[[], T]) -> T:
        """`work()` on the tools thread (it imports `service.engine.tools` there); its result, or what it
        raised."""
        with self._tools_lock:
            if self._tools is None:
                self._tools = ThreadPoolExecutor(max_workers=TOOL_THREADS, thread_name_prefix="engine-tools")
            done = self._tools.submit(work)
        return done.result()

    def export_artifact(self, data: bytes, fmt: str) -> bytes:
        """A stored profile's artifact (its bytes) as `fmt` (`gguf` or `peft`); `SteerError` (field "format")
        for a profile that has no such form."""

        def work() -> bytes:
            from service.engine.tools import export_artifact

            return export_artifact(data, fmt)

        return self._on_tools_thread(work)

    def import_adapter(self, config: Any, weights: bytes, *, max_rank: int, max_bytes: int) -> ImportedAdapter:
        """A tenant's peft LoRA adapter checked against the served model, as a lora profile's artifact;
        `SteerError` naming the field for one that does not fit, `EngineUnavailable` when the served model's
        layout cannot be read."""
        model, served = self.settings.model, self._served()

        def work() -> ImportedAdapter:
            from service.engine.tools import import_adapter

            return import_adapter(config, weights, model, served, max_rank=max_rank, max_bytes=max_bytes)

        return self._on_tools_thread(work)


def _load(name: str) -> Any:
    from steer_core.models import load_model

    _fetch_in_child(name)
    return load_model(name)


def _fetch_in_child(name: str) -> None:
    """Fetch and convert the default model in a child process when this home lacks it (once per home: the
    child waits on the home's lock while another process converts it). The conversion holds the
    interpreter's lock for half a second at a time, which would stall this process's request threads (its
    `/healthz`); the child has its own. Should the child fail, `load_model` fetches here and says why."""
    from steer_core.defaults import DEFAULT_MODEL, pluristeer_home

    if name != DEFAULT_MODEL or (pluristeer_home() / "models" / DEFAULT_MODEL / "model.safetensors").exists():
        return
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
    code = "from steer_core.models import fetch_default_model; fetch_default_model()"
    result = subprocess.run([sys.executable, "-c", code], env=env, stdin=subprocess.DEVNULL, check=False)
    if result.returncode != 0:
        log.warning("fetching %s in a child process failed (exit %s); fetching it here", name, result.returncode)


def _loading_phase(name: str) -> str:
    """What a load of `name` does now, read off the disk without importing torch: the default model is
    fetched and converted once per home before it loads."""
    from steer_core.defaults import DEFAULT_MODEL, pluristeer_home

    models = pluristeer_home() / "models"
    if name == DEFAULT_MODEL and not (models / DEFAULT_MODEL / "model.safetensors").exists():
        return f"fetching and converting it once into {models}"
    return "loading its weights"


def engine_client(app: Flask | None = None) -> EngineClient:
    """The app's `EngineClient` (registered by `service.api.chat.init_app`)."""
    from flask import current_app

    client: EngineClient = (app or current_app).extensions[ENGINE]
    return client
