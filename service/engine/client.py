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
"""

from __future__ import annotations

import logging
import threading
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

    def get(self) -> Engine:
        """The engine, started on first use; `EngineUnavailable` when the model cannot be loaded or the
        client is dead."""
        with self.lock:
            if self.dead is not None:
                raise EngineUnavailable(self.dead, retry_after=60)
            if self.engine is None:
                from service.engine.engine import GenerationEngine

                settings = self.settings
                try:
                    lm = self._served() or _load(settings.model)
                except SteerError as exc:
                    self.error = f"cannot load {settings.model!r}: {exc.message}"
                    raise EngineUnavailable(self.error, "model") from None
                self.engine = GenerationEngine(
                    lm, profiles=self._profiles,
                    max_batch_size=settings.max_batch_size, batch_wait_ms=settings.batch_wait_ms,
                    max_new_tokens=settings.max_new_tokens, max_queue=4 * settings.max_batch_size,
                    request_timeout_s=REQUEST_TIMEOUT_S, cache_size=max(1, settings.profile_lru_size)).start()
                self.error = None
            return self.engine

    def probe(self) -> dict[str, Any]:
        """The readiness probe's view: whether an engine runs, and why not."""
        engine = self.engine
        return {"loaded": self.dead is None and engine is not None and engine.running,
                "error": self.dead or self.error}

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the engine (and the tools thread); False (and the client dead) when the engine's thread did
        not end in time."""
        with self._tools_lock:
            tools, self._tools = self._tools, None
        if tools is not None:
            tools.shutdown(wait=False)
        with self.lock:
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

    return load_model(name)


def engine_client(app: Flask | None = None) -> EngineClient:
    """The app's `EngineClient` (registered by `service.api.chat.init_app`)."""
    from flask import current_app

    client: EngineClient = (app or current_app).extensions[ENGINE]
    return client
