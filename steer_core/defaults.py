"""The default model's name and the cache directory: plain constants, importable without torch (the
command line shows them in `--help` without loading the library)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"


def pluristeer_home() -> Path:
    """Cache directory for models and artifacts (`PLURISTEER_HOME`, default `~/.cache/pluristeer`)."""
    return Path(os.environ.get("PLURISTEER_HOME") or Path.home() / ".cache" / "pluristeer")
