"""Errors a user can cause.

Every one of them is a `UserError`: the UI shows its message, the API maps it to a 4xx
status (`status_code`), and nothing has been written or changed when it is raised.
Anything else that escapes is a bug in this project.
"""
from __future__ import annotations


class UserError(Exception):
    """A request the engine refuses, with a message meant for the person who sent it."""

    status_code = 422

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class InvalidParameter(UserError):
    """A field outside its allowed range or of the wrong form (HTTP 422)."""


class NotFound(UserError):
    """Something named that does not exist (HTTP 404)."""

    status_code = 404


class SamplerNotFound(NotFound):
    pass


class ModelNotFound(NotFound):
    pass


class ModelLoadError(UserError):
    """A checkpoint that exists but cannot be loaded (corrupt, unknown architecture, refused)."""


class InterruptedException(Exception):
    """Raised by an after_sample hook to stop sampling; the sampler returns what it has."""
