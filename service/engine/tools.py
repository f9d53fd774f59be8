"""Tensor work the API needs besides generating, done on the engine's side: `service.engine.client` runs
these functions on its tools thread, so request threads hand over bytes and plain data and get the same
back. None of them needs the model loaded: an export reads the artifact alone, and an import checks the
adapter against the served model's layout (module names and shapes from its config, on the meta device).
"""

from __future__ import annotations

import functools
from typing import Any

from service.engine.types import EngineUnavailable, ImportedAdapter
from steer_core.errors import SteerError
from steer_core.export import cold_fd_as_lora, control_vector_gguf, peft_archive
from steer_core.lora import imported_profile
from steer_core.models import LanguageModel, ModelLayout, model_layout, read_model_layout
from steer_core.profile import Profile

EXPORT_FORMATS = ("gguf", "peft")


def export_artifact(data: bytes, fmt: str) -> bytes:
    """A stored profile's artifact as `fmt`: a llama.cpp control vector (`gguf`: constant-vector profiles) or
    a peft LoRA adapter folder as .tar.gz (`peft`: lora profiles, and cold_fd profiles as the low-rank update
    they step along). `SteerError` (field "format") for a profile that has no such form."""
    if fmt == "gguf":
        return control_vector_gguf(Profile.from_bytes(data))
    if fmt == "peft":
        profile = Profile.from_bytes(data)
        if profile.method == "cold_fd":
            profile = cold_fd_as_lora(profile)
        return peft_archive(profile)
    raise ValueError(f"no export to {fmt!r}; one of {', '.join(EXPORT_FORMATS)}")


def import_adapter(config: Any, weights: bytes, model: str, served: LanguageModel | None, *, max_rank: int,
                   max_bytes: int) -> ImportedAdapter:
    """A tenant's peft LoRA adapter (its `adapter_config.json` and safetensors bytes) checked against the
    served model `model` (`served`: the model itself when the process was handed one) and stored as a lora
    profile's artifact. `SteerError` naming the field for an adapter that does not fit;
    `EngineUnavailable` when the served model's layout cannot be read."""
    profile = imported_profile(config, weights, served_layout(model, served), max_rank=max_rank,
                               max_bytes=max_bytes, aliases=(model,))
    profile.model_name = model
    return ImportedAdapter(artifact=profile.to_bytes(),
                           chosen={"layer": profile.layer, "strength": profile.strength,
                                   "positions": profile.positions, "rank": profile.params["rank"]})


def served_layout(model: str, served: LanguageModel | None = None) -> ModelLayout:
    """The served model's layout (fingerprint, module shapes): plain data read once from its config, so an
    import neither loads the model nor touches the engine's."""
    if served is not None:  # a model handed to the app (tests)
        return model_layout(served)
    return _read_layout(model)


@functools.lru_cache(maxsize=4)
def _read_layout(name: str) -> ModelLayout:
    try:
        return read_model_layout(name)
    except SteerError as exc:
        raise EngineUnavailable(f"cannot read the served model: {exc.message}", "model") from None
