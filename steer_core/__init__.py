"""steer_core: steering profiles for causal LMs (DiffMean, COLD-Steer, ODESteer, LoRA), as a plain library.

The public names below load on first use (torch and transformers take seconds to import), so a program
that needs only `steer_core.errors` or `steer_core.data` starts fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS = {
    "build_profile": "build", "split_sample": "build",
    "Calibration": "calibration",
    "OpinionItem": "data", "item_from_json": "data", "items_from_json": "data", "load_items": "data",
    "make_item": "data", "sample_hash": "data",
    "ModelLoadError": "errors", "ProfileError": "errors", "SteerError": "errors",
    "evaluate": "evaluation",
    "METHODS": "methods", "Method": "methods", "get_method": "methods", "intervention": "methods",
    "summarize": "metrics",
    "DEFAULT_MODEL": "defaults", "LanguageModel": "models", "fetch_default_model": "models", "load_model": "models",
    "Profile": "profile",
    "answer_distributions": "prompts", "format_prompt": "prompts", "read_answers": "prompts",
    "QuestionLean": "question_lean",
    "ConstantShift": "steering", "Intervention": "steering", "RowSteering": "steering", "SteeringHooks": "steering",
    "apply": "steering", "compose": "steering",
}

__all__ = [
    "DEFAULT_MODEL", "METHODS", "Calibration", "ConstantShift", "Intervention", "LanguageModel", "Method",
    "ModelLoadError", "OpinionItem", "Profile", "ProfileError", "QuestionLean", "RowSteering", "SteerError",
    "SteeringHooks",
    "answer_distributions", "apply", "build_profile", "compose", "evaluate", "fetch_default_model", "format_prompt",
    "get_method", "intervention", "item_from_json", "items_from_json", "load_items", "load_model", "make_item",
    "read_answers", "sample_hash", "split_sample", "summarize",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'steer_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"steer_core.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from steer_core.build import build_profile, split_sample
    from steer_core.calibration import Calibration
    from steer_core.data import OpinionItem, item_from_json, items_from_json, load_items, make_item, sample_hash
    from steer_core.defaults import DEFAULT_MODEL
    from steer_core.errors import ModelLoadError, ProfileError, SteerError
    from steer_core.evaluation import evaluate
    from steer_core.methods import METHODS, Method, get_method, intervention
    from steer_core.metrics import summarize
    from steer_core.models import LanguageModel, fetch_default_model, load_model
    from steer_core.profile import Profile
    from steer_core.prompts import answer_distributions, format_prompt, read_answers
    from steer_core.question_lean import QuestionLean
    from steer_core.steering import ConstantShift, Intervention, RowSteering, SteeringHooks, apply, compose
