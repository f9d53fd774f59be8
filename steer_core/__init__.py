"""steer_core: steering profiles for causal LMs (DiffMean, COLD-Steer, ODESteer, LoRA), as a plain library."""

from steer_core import (  # noqa: F401  (register the COLD-Steer methods)
    cold_fd,
    cold_kernel,
    diffmean,  # noqa: F401  (registers the method)
    lora,  # noqa: F401  (registers the method)
    odesteer,  # noqa: F401  (registers the method)
)
from steer_core.build import build_profile, split_sample
from steer_core.data import OpinionItem, item_from_json, items_from_json, load_items, make_item, sample_hash
from steer_core.errors import ModelLoadError, ProfileError, SteerError
from steer_core.methods import METHODS, Method, get_method, intervention
from steer_core.metrics import summarize
from steer_core.models import DEFAULT_MODEL, LanguageModel, fetch_default_model, load_model
from steer_core.profile import Profile
from steer_core.prompts import answer_distributions, format_prompt
from steer_core.steering import ConstantShift, Intervention, RowSteering, SteeringHooks, apply, compose

__all__ = [
    "DEFAULT_MODEL", "METHODS", "ConstantShift", "Intervention", "LanguageModel", "Method", "ModelLoadError",
    "OpinionItem", "Profile", "ProfileError", "RowSteering", "SteerError", "SteeringHooks", "answer_distributions",
    "apply", "build_profile", "compose", "fetch_default_model", "format_prompt", "get_method", "intervention",
    "item_from_json", "items_from_json", "load_items", "load_model", "make_item", "sample_hash", "split_sample",
    "summarize",
]
