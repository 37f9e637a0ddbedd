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


class ModelLoadError(TokenmillError):
    """A checkpoint is missing, corrupt, of an unknown architecture, or has a tensor of the wrong shape."""


class ConfigError(TokenmillError):
    """The engine is misconfigured; `setting` names the offending knob (raised at start-up, not per request)."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
        self.message = message
