"""The engine's one cache: what steering plans resolve to on the served model.

A plan entry (`service.engine.types.PlannedProfile`) names a profile by its artifact digest. Resolving it
loads the profile from the profile source (the service's profile cache), builds the method's
intervention for the model (tensors on the model's device, built once; `displacement` a pure function of
them and the forward call) and applies the entry's positions. A plan composes its entries' interventions
with `steer_core.steering.compose` into one row's steering; a profile's question lean (a probe of the
prompt's states that sets its output calibration's lean) is kept beside its intervention for score
reads. Both results are cached by content in one bounded LRU. Only the engine thread resolves; the lock
lets other threads read the cache's size.

Another kind of per-row steering (an adapter applied to some Linear modules per row, say) is another
kind of plan entry resolved here into what the engine's hooks apply; request threads stay the same.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import cachetools

from service.engine.types import (
    INVALID,
    MODEL_MISMATCH,
    UNAVAILABLE,
    AppliedProfile,
    PlannedProfile,
    SteeringPlan,
    SteeringRejected,
)
from steer_core.errors import SteerError
from steer_core.methods import check_positions, get_method, intervention
from steer_core.models import LanguageModel
from steer_core.profile import Profile
from steer_core.question_lean import QuestionLean
from steer_core.steering import RowSteering, compose

# A profile's artifact by its sha256 (the service passes its profile cache's `load`).
ProfileSource = Callable[[str], Profile]


class InterventionCache:
    """The engine's one cache: what a plan entry resolves to (its intervention for the served model, and
    what its artifact says), and what a whole plan composes to, by content.

    Keys: ``("profile", digest, model fingerprint, positions)`` and ``("plan", model fingerprint,
    plan key)``; least recently used entries leave first. Interventions are plain data (tensors on the
    model's device, built once) and pure functions of them; rows whose plans are equal share one composed
    steering, so the hooks run it once for all of them.
    """

    def __init__(self, lm: LanguageModel, profiles: ProfileSource | None, size: int = 128) -> None:
        self.lm = lm
        self.profiles = profiles
        self._entries: cachetools.LRUCache[tuple, Any] = cachetools.LRUCache(maxsize=max(1, size))
        self._lock = threading.Lock()  # engine thread writes; /metrics reads the size

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _get(self, key: tuple) -> Any:
        with self._lock:
            return self._entries.get(key)

    def _put(self, key: tuple, value: Any) -> None:
        with self._lock:
            self._entries[key] = value

    def resolve(self, plan: SteeringPlan | None) -> tuple[RowSteering | None, tuple[AppliedProfile, ...]]:
        """The row steering of `plan` (None when it steers nothing) and what each entry applied."""
        if not plan:
            return None, ()
        key = ("plan", self.lm.fingerprint, plan.key())
        hit = self._get(key)
        if hit is not None:
            return hit
        weighted = []
        applied = []
        for entry in plan.profiles:
            iv, found, _ = self._entry(entry)
            weighted.append((iv, float(entry.weight)))
            applied.append(found)
        try:
            steering = compose(weighted)
        except SteerError as exc:
            raise SteeringRejected(f"these profiles do not blend: {exc.message}", plan.profiles[0].field,
                                   INVALID) from None
        value = (steering, tuple(applied))
        self._put(key, value)
        return value

    def question_leans(self, plan: SteeringPlan | None) -> tuple[QuestionLean | None, ...]:
        """Each entry's question lean (None: its profile has none), for the readers of answer distributions."""
        return tuple(self._entry(entry)[2] for entry in plan.profiles) if plan else ()

    def _entry(self, entry: PlannedProfile) -> tuple[Any, AppliedProfile, QuestionLean | None]:
        key = ("profile", entry.digest, self.lm.fingerprint, entry.positions)
        hit = self._get(key)
        if hit is not None:
            return hit
        name = entry.name or f"artifact {entry.digest[:12]}"
        if self.profiles is None:
            raise SteeringRejected("this engine has no profile source", entry.field, UNAVAILABLE)
        try:
            profile = self.profiles(entry.digest)
        except Exception as exc:  # missing, corrupted or unreadable: never applied
            raise SteeringRejected(f"{name}'s artifact is unavailable: {exc}", entry.field, UNAVAILABLE) from None
        try:
            iv = intervention(profile, self.lm)  # checks the model fingerprint
            self.lm.check_layer(iv.layer)
        except SteerError as exc:
            raise SteeringRejected(f"{name}: {exc.message}", entry.field, MODEL_MISMATCH) from None
        if entry.positions is not None and entry.positions != iv.positions:
            try:
                check_positions(entry.positions, get_method(profile.method))
            except SteerError as exc:
                raise SteeringRejected(f"{name}: {exc.message}", "steering.positions", INVALID) from None
            if not dataclasses.is_dataclass(iv):
                raise SteeringRejected(f"{profile.method} profiles cannot change positions", "steering.positions",
                                       INVALID)
            iv = dataclasses.replace(iv, positions=entry.positions)
        value = (iv, AppliedProfile(method=profile.method, layer=int(profile.layer),
                                    strength=float(profile.strength)), profile.question_lean)
        self._put(key, value)
        return value
