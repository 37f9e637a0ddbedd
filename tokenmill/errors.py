"""User-facing error types. Every message names the field (or file) and the limit it broke."""

from __future__ import annotations


class TokenmillError(Exception):
    """Base class for errors tokenmill raises on purpose."""


class InvalidRequestError(TokenmillError, ValueError):
    """A request's values are out of range; `field` names the offending parameter."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class RequestFailedError(TokenmillError):
    """One request failed while the engine computed it and was aborted alone; the others went on.

    `field` names the request field at fault when the failure was the request's own doing (a grammar that
    turned out too costly to match); None marks an engine fault. The message is about this request only."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ConfigError(TokenmillError):
    """An engine setting is out of range or cannot work on this machine or model; `setting` names it.

    Raised while an engine is built, never for a request, so servers do not report it as a client error."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
        self.message = message


class ModelLoadError(TokenmillError):
    """A checkpoint is missing, corrupt, of an unknown architecture, or has a tensor of the wrong shape."""
