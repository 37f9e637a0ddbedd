"""The research assistant's one error type: a message for the user, printed without a traceback."""

from __future__ import annotations

from tokenmill.errors import TokenmillError


class ResearchError(TokenmillError):
    """Bad input or an unusable endpoint; the message names what and the limit."""


class EndpointError(ResearchError):
    """The model endpoint is down or refused a request."""


class ReplyFormatError(ResearchError):
    """The model's reply is not the JSON that was asked for (an endpoint that ignores response_format)."""
