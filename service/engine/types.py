"""What request threads and the engine thread hand each other: plain data and exceptions, no torch.

A request's steering is a `SteeringPlan`: the artifact digests of its profiles with their weights and
positions. The engine thread alone turns a plan into tensors (`service.engine.interventions.InterventionCache`): it
loads each profile through the profile cache, builds its intervention for the served model, composes
the blend and caches the result. A new kind of per-row steering is a new kind of plan entry plus what
the engine builds from it; request threads stay torch-free either way.

A generation comes back through a `GenerationHandle` (text chunks, then a `GenerationResult`); a score
request as `Scored`. Routes import all of this through `service.engine.client`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from steer_core.errors import SteerError

# Alternatives a request may ask for with each token's log-probability (OpenAI's limit).
MAX_TOP_LOGPROBS = 20

# Why the engine refused a plan entry (the wire map turns each into its status and type).
UNAVAILABLE, MODEL_MISMATCH, INVALID = "unavailable", "model_mismatch", "invalid"

FINISH_REASONS = ("stop", "length", "cancelled")


# ------------------------------------------------------------------------------------------- plans

@dataclass(frozen=True)
class PlannedProfile:
    """One weighted profile of a plan. `field` and `name` (the request field it came from, the profile's
    name) only label errors."""

    digest: str  # the artifact's sha256
    weight: float = 1.0
    positions: str | None = None  # None: the profile's own positions
    field: str = "steering"
    name: str = ""

    def key(self) -> tuple[str, float, str | None]:
        return (self.digest, float(self.weight), self.positions)


@dataclass(frozen=True)
class SteeringPlan:
    """A row's steering as plain data: a weighted blend of stored profiles (empty: unsteered)."""

    profiles: tuple[PlannedProfile, ...] = ()

    def key(self) -> tuple[tuple[str, float, str | None], ...]:
        """What identifies the composed steering (error labels aside)."""
        return tuple(p.key() for p in self.profiles)

    def __bool__(self) -> bool:
        return bool(self.profiles)


@dataclass(frozen=True)
class AppliedProfile:
    """What the engine found in a planned profile's artifact."""

    method: str
    layer: int
    strength: float


# ------------------------------------------------------------------------------------------- errors

class EngineError(RuntimeError):
    """Base of the engine's request failures."""


class GenerationFailed(EngineError):
    """This request's row failed; the other rows of its batch went on."""


class EngineStopped(EngineError):
    """The engine was stopped before the request finished."""


class EngineBusy(EngineError):
    """The engine's queue is full; the request was not admitted (retry after `retry_after` seconds)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(EngineError, TimeoutError):
    """The request did not finish before its deadline; its row was dropped."""


class SteeringRejected(EngineError):
    """A plan entry cannot steer: its artifact is unavailable, it does not fit the served model, or it
    is invalid. `field` is the entry's request field, `reason` one of UNAVAILABLE, MODEL_MISMATCH,
    INVALID."""

    def __init__(self, message: str, field: str, reason: str) -> None:
        super().__init__(message)
        self.field = field
        self.reason = reason


class EngineUnavailable(EngineError):
    """The process has no engine to give: its model cannot be loaded (`field` "model"), a stopped engine
    left the slot dead, or every engine-bound request slot is taken (`retry_after` seconds, when a retry
    may help)."""

    def __init__(self, message: str, field: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.retry_after = retry_after


# ------------------------------------------------------------------------------------------- generation

@dataclass(frozen=True)
class SamplingParams:
    """How one request samples: `temperature == 0` is greedy; `stop` strings end the text (excluded).

    `top_logprobs` None: no log-probabilities; k: each generated token comes with its log-probability and
    the k most likely tokens at its step (see `TokenLogprob`).
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # run to max_tokens whatever the model says (benchmarks)
    top_logprobs: int | None = None

    def check(self, max_new_tokens: int) -> None:
        """Raise `SteerError` naming the field when a value is out of range."""
        if not isinstance(self.max_tokens, int) or not 1 <= self.max_tokens <= max_new_tokens:
            raise SteerError(f"must be an integer in 1..{max_new_tokens}", "max_tokens")
        if not np.isfinite(self.temperature) or not 0.0 <= self.temperature <= 2.0:
            raise SteerError("must be a number in 0..2", "temperature")
        if not np.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise SteerError("must be a number in (0, 1]", "top_p")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SteerError("stop strings must be non-empty strings", "stop")
        if self.top_logprobs is not None and (not isinstance(self.top_logprobs, int)
                                              or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS):
            raise SteerError(f"must be an integer in 0..{MAX_TOP_LOGPROBS}", "top_logprobs")


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability, and the most likely tokens at its step (most likely first).

    Read from the model's own logits at that step, steering applied, as a log-softmax over the vocabulary
    before temperature and top_p (OpenAI's convention: greedy decoding picks the first of `top`).
    """

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class TextChunk:
    """New text of one request (a stop string's prefix is held back until it is known not to be one), and,
    when asked for, the log-probabilities of the tokens whose text it completes."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # one of FINISH_REASONS
    prompt_tokens: int
    completion_tokens: int
    # When asked for: the tokens of `text` (a stop string that cuts a token keeps it whole).
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class Scored:
    """Answer distributions of a score request, and what steered each item."""

    distributions: list[np.ndarray]
    applied: list[tuple[AppliedProfile, ...]]
    # Per item, per plan entry: the lean its profile's question lean read off the item's prompt (None: the
    # profile has none; its recorded calibration's lean applies).
    leans: list[tuple[float | None, ...]]


STARTED, DONE, CHUNK, ERROR = "started", "done", "chunk", "error"


class GenerationHandle:
    """What a request thread holds: the steering the engine applied, text chunks as they come, the final
    result, and `cancel`."""

    def __init__(self, request_id: int, prompt_tokens: int, deadline: float) -> None:
        self.id = request_id
        self.prompt_tokens = prompt_tokens
        self.deadline = deadline  # time.monotonic() past which the engine drops the request
        self.applied: tuple[AppliedProfile, ...] | None = None  # set once the engine resolved the plan
        self._events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None

    def cancel(self) -> None:
        """Ask the engine to drop this request; its batch slot is freed at the next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _take(self, timeout: float | None) -> tuple[str, Any] | None:
        """The next event, with what it says recorded (applied, result, error); None after `timeout` s."""
        try:
            kind, value = self._events.get(timeout=timeout)
        except queue.Empty:
            return None
        if kind == STARTED:
            self.applied = value
        elif kind == DONE:
            self._result = value
        elif kind == ERROR:
            self._error = value
        return kind, value

    def next(self, timeout: float | None = None) -> TextChunk | GenerationResult | None:
        """The next text chunk, or the result once the request finished; None when nothing came within
        `timeout` seconds. Raises the request's error (`SteeringRejected`, `GenerationFailed`, ...)."""
        while True:
            if self._error is not None:
                raise self._error
            if self._result is not None:
                return self._result
            event = self._take(timeout)
            if event is None:
                return None
            if event[0] == CHUNK:
                return event[1]

    def started(self, timeout: float | None = None) -> tuple[AppliedProfile, ...] | None:
        """What the engine applied once it accepted the request's steering; raises what it refused it
        with; None when neither happened within `timeout` seconds."""
        while self.applied is None:
            if self._error is not None:
                raise self._error
            event = self._take(timeout)
            if event is None:
                return None
            if event[0] in (CHUNK, DONE):  # a request is started before it produces anything
                raise RuntimeError(f"unexpected {event[0]} event before the request started")
        return self.applied

    def chunks(self, timeout: float | None = None) -> Iterator[TextChunk]:
        """Text chunks as they are generated; ends when the request finishes, raises if it failed.

        `timeout` bounds the wait for each chunk (TimeoutError past it).
        """
        while True:
            item = self.next(timeout)
            if item is None:
                raise TimeoutError("no output from the generation engine in time")
            if isinstance(item, GenerationResult):
                return
            yield item

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait for the whole generation (`timeout` per chunk) and return it."""
        for _ in self.chunks(timeout):
            pass
        assert self._result is not None
        return self._result

    def put(self, kind: str, value: Any) -> None:
        """Deliver an event (STARTED, CHUNK, DONE, ERROR): the engine thread's side of the handle."""
        self._events.put((kind, value))


@dataclass(frozen=True)
class ImportedAdapter:
    """A tenant's adapter, imported as a lora profile: its artifact's bytes, and the choices its row records."""

    artifact: bytes
    chosen: dict[str, Any]  # layer, strength, positions, rank


@dataclass
class EngineStats:
    """Counters a request thread may read at any time (for /metrics and tests)."""

    active_rows: int = 0  # rows in the running batch
    queued: int = 0  # requests waiting for the engine (generation rows and score requests)
    steps: int = 0  # decode steps run
    prefills: int = 0  # prefill calls run
    tokens: int = 0  # tokens generated
    finished: int = 0  # generation requests finished (any reason, failures included)
    failed: int = 0
    cancelled: int = 0
    expired: int = 0  # requests dropped at their deadline (counted in `failed` too)
    rejected: int = 0  # requests whose steering plan could not be resolved (never admitted)
    largest_batch: int = 0
    steered_steps: int = 0  # forward calls that ran with steering hooks attached
    score_batches: int = 0  # whole scoring reads run (between decode steps, or idle)
    score_rows: int = 0  # questions in the last whole read
    score_riders: int = 0  # questions read riding decode steps (counted as each is read)
