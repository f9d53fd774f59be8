"""What request threads hand the generation engine and get back: plain data and exceptions, no torch.

A request's steering is a `SteeringPlan`: the artifact digests of its profiles with their weights and
positions. The engine thread alone turns a plan into tensors (`service.engine.interventions.InterventionCache`): it
loads each profile through the profile cache, builds its intervention for the served model, composes
the blend and caches the result. A new kind of per-row steering is a new kind of plan entry plus what
the engine builds from it; request threads stay torch-free either way.
"""

from __future__ import annotations

from dataclasses import dataclass

# Alternatives a request may ask for with each token's log-probability (OpenAI's limit).
MAX_TOP_LOGPROBS = 20

# Why the engine refused a plan entry (the wire map turns each into its status and type).
UNAVAILABLE, MODEL_MISMATCH, INVALID = "unavailable", "model_mismatch", "invalid"


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
