"""Errors raised by steer_core. Each names the field or file at fault so callers can report it."""

from __future__ import annotations


class SteerError(ValueError):
    """Bad input to the steering library.

    `field` names the offending field (``"items[3].target"``, ``"layer"``, ``"data"``) so the HTTP layer
    and the CLI can point at it without parsing the message.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class ModelLoadError(SteerError):
    """A model name, directory or file that cannot be loaded as a causal LM."""


class ProfileError(SteerError):
    """A profile file that is corrupted, or was built for another model."""
