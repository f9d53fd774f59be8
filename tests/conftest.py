"""Shared fixtures: the default model's files, tiny and real models, the shared data directory; and the
service tests' (`service_fixtures.py`: settings, databases, the app, keys; `runtime.py`: Redis, the worker)."""

from __future__ import annotations

from pathlib import Path

import pytest
from runtime import *  # noqa: F403  (redis_url, celery_worker, ...)
from service_fixtures import *  # noqa: F403  (settings, database_url, app, client, auth, ...)
from support import SHARED_DATA, make_tiny

from steer_core.models import LanguageModel, load_model


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    from steer_core.models import fetch_default_model

    return fetch_default_model()


@pytest.fixture(scope="session")
def tiny_lm() -> LanguageModel:
    return make_tiny("llama")


@pytest.fixture(scope="session")
def default_lm(default_model_path) -> LanguageModel:
    """The real default model (SmolLM2-135M-Instruct), loaded once per test session."""
    return load_model()


@pytest.fixture
def shared_data() -> Path:
    """`../shared/data` when present; tests that need it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that takes the default model (its files or the loaded model) is a `model` test, marked or not:
    `-m "not model"` runs what needs no model files (the tiny models bring their own tokenizer)."""
    for item in items:
        if {"default_lm", "default_model_path"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.model)
