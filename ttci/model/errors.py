"""One exception base for TT CI; every error carries a hint that says how to fix it."""

from __future__ import annotations

__all__ = [
    "AgentError",
    "ApiError",
    "BadInput",
    "BootError",
    "CommandFailed",
    "ImageError",
    "MissingTool",
    "TTError",
]


class TTError(Exception):
    """Base of every error TT CI raises on purpose."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class BadInput(TTError):
    """The user asked for something that does not parse or cannot exist."""


class CommandFailed(TTError):
    """A subprocess failed; the message names the command and quotes what it printed."""


class MissingTool(TTError):
    """A program we need is not installed."""


class ImageError(TTError):
    """Building, scanning or checking an image failed."""


class BootError(TTError):
    """A VM did not boot to a working agent."""


class AgentError(TTError):
    """The agent refused or failed a request."""


class ApiError(TTError):
    """The scheduler refused a request."""

    def __init__(self, message: str, *, hint: str | None = None, status: int = 0) -> None:
        super().__init__(message, hint=hint)
        self.status = status
