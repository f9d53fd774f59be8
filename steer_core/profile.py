"""`Profile`: a steering profile's tensors and metadata, stored as safetensors with JSON metadata.

Never pickled: tensors go in the safetensors body, everything else in one JSON string in its header.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from steer_core.calibration import IDENTITY, Calibration
from steer_core.data import OpinionItem
from steer_core.errors import ProfileError, SteerError
from steer_core.models import LanguageModel
from steer_core.question_lean import TENSOR_NAMES as LEAN_TENSORS
from steer_core.question_lean import QuestionLean

FORMAT_VERSION = 1
_META_KEY = "pluristeer"


@dataclass
class Profile:
    """What a method learned from a sample, enough to steer a model that matches `model_fingerprint`.

    `strength` is the method's one scale knob (DiffMean's alpha, COLD's eta, ODESteer's path length T);
    0 means the build found no setting that beat the unsteered model. `params` holds the method's other
    hyperparameters, `metrics` the held-out scores and the hyperparameter search. `calibration` maps the
    steered answer distribution (temperature and ordinal lean, fitted out of fold by the build); readers of
    answer distributions (`/v1/score`, `pluristeer eval`, the offline comparison) apply it. `question_lean`,
    when the build shipped one, replaces the calibration's lean by one read off each question's prompt
    (`steer_core.question_lean`); its tensors travel beside `tensors` in the same file.
    """

    method: str
    model_name: str
    model_fingerprint: str
    layer: int
    positions: str
    strength: float
    tensors: dict[str, Tensor]
    params: dict[str, Any] = field(default_factory=dict)
    sample_hash: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    calibration: Calibration = IDENTITY
    question_lean: QuestionLean | None = None
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    format_version: int = FORMAT_VERSION

    def metadata(self) -> dict[str, Any]:
        return {"method": self.method, "model_name": self.model_name, "model_fingerprint": self.model_fingerprint,
                "layer": self.layer, "positions": self.positions, "strength": self.strength,
                "params": self.params, "sample_hash": self.sample_hash, "metrics": self.metrics,
                "calibration": self.calibration.to_json(),
                "question_lean": None if self.question_lean is None else self.question_lean.to_json(),
                "created_at": self.created_at, "format_version": self.format_version}

    def calibrations(self, items: Sequence[OpinionItem], states: Mapping[int, np.ndarray] | None) -> list[Calibration]:
        """Each item's output calibration: the profile's own, with its lean read off the item's prompt when the
        profile has a question lean (`states`: block -> (items, hidden), from the same read)."""
        if self.question_lean is None:
            return [self.calibration] * len(items)
        if states is None or self.question_lean.layer not in states:
            raise ProfileError(f"its question lean needs the prompts' states after block {self.question_lean.layer}",
                               "profile")
        return self.question_lean.calibrations(self.calibration.temperature, states[self.question_lean.layer])

    def all_tensors(self) -> dict[str, Tensor]:
        """What the file's body holds: the method's tensors and the question lean's."""
        return {**self.tensors, **(self.question_lean.tensors() if self.question_lean is not None else {})}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.all_tensors().values())

    def to_bytes(self) -> bytes:
        stored = self.all_tensors()
        for name, t in stored.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ProfileError(f"tensor {name!r} has NaN or inf values; refusing to store it", "profile")
        tensors = {k: v.detach().cpu().contiguous() for k, v in stored.items()}
        return st_save(tensors, metadata={_META_KEY: json.dumps(self.metadata(), allow_nan=False)})

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "profile") -> Profile:
        try:
            tensors = st_load(data)
            meta = _read_metadata(data)
            meta["calibration"] = Calibration.from_json(meta.get("calibration", IDENTITY.to_json()))
            lean = meta.pop("question_lean", None)
            meta["question_lean"] = None if lean is None else QuestionLean.from_parts(lean, tensors)
            tensors = {k: v for k, v in tensors.items() if k not in LEAN_TENSORS}
            return cls(tensors=tensors, **meta)
        except SteerError as exc:
            raise ProfileError(f"not a valid pluristeer profile: {exc.field}: {exc.message}", source) from None
        except (SafetensorError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ProfileError(f"not a valid pluristeer profile: {exc}", source) from None

    def save(self, path: str | Path) -> Path:
        """Write atomically: a reader never sees a half-written file, a failure leaves none behind."""
        path = Path(path)
        data = self.to_bytes()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path, lm: LanguageModel | None = None) -> Profile:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ProfileError(f"cannot read {path}: {exc.strerror}", str(path)) from None
        profile = cls.from_bytes(data, source=str(path))
        if lm is not None:
            profile.check_model(lm, source=str(path))
        return profile

    def check_model(self, lm: LanguageModel, source: str = "profile") -> None:
        if self.model_fingerprint != lm.fingerprint:
            raise ProfileError(
                f"built for model {self.model_name!r} (fingerprint {self.model_fingerprint}), "
                f"not for the loaded {lm.name!r} (fingerprint {lm.fingerprint})", source)
        lm.check_layer(self.layer, field=f"{source}: layer")
        if self.question_lean is not None:
            lm.check_layer(self.question_lean.layer, field=f"{source}: question_lean.layer")
            if self.question_lean.hidden_size != lm.hidden_size:
                raise ProfileError(f"its question lean reads {self.question_lean.hidden_size} hidden units, the "
                                   f"loaded model has {lm.hidden_size}", source)


def _read_metadata(data: bytes) -> dict[str, Any]:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    meta = json.loads(header["__metadata__"][_META_KEY])
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unsupported format_version {meta.get('format_version')!r}")
    if not isinstance(meta.get("strength"), int | float) or not math.isfinite(meta["strength"]):
        raise ValueError("strength is missing or not finite")
    return meta
