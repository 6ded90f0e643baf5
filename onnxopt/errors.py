"""Exception types that separate user mistakes (exit 2, one line) from bugs (tracebacks)."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user asked for: bad path, bad pipeline, wrong data.

    The CLI prints ``str(error)`` on one line and exits with code 2.
    """


class PipelineError(UserError):
    """A pipeline spec that cannot be parsed or names unknown passes or options."""


class DataError(UserError):
    """Input feeds that do not fit the model (names, shapes, dtypes, non-finite values)."""


class ModelError(UserError):
    """A model file that cannot be read, is not ONNX, or is invalid."""


class ValidationFailed(Exception):
    """A validation check or a gate failed while ``strict`` handling was requested."""

    def __init__(self, message: str, pass_name: str | None = None) -> None:
        super().__init__(message)
        self.pass_name = pass_name
