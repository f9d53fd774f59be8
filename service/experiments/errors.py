"""The experiments' own errors: what was refused, naming the request field at fault. They say nothing of
HTTP: `service.api.errors.api_error` maps each to its status and wire type (the API's and the console's
pages alike)."""

from __future__ import annotations


class ExperimentError(Exception):
    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class NotFound(ExperimentError):
    """What the request names does not exist for this tenant (an experiment, a profile, a group, a
    response): another tenant's is just not found."""

    def __init__(self, what: str, field: str | None = None) -> None:
        super().__init__(f"{what} not found", field)


class Invalid(ExperimentError):
    """A value the experiment cannot take (a weight, a variant name, a time, a user outside the scope)."""


class ProfileNotReady(ExperimentError):
    """A variant names a profile whose build has not finished (or failed)."""


class ExperimentStopped(ExperimentError):
    """A change to a stopped experiment: stopping is final."""
