"""The exceptions spyre_cb raises. Every one derives from :class:`SpyreCBError`.

The Rust core raises these same classes across the PyO3 boundary, so callers
never see a panic or a bare ``Exception``.
"""

from __future__ import annotations


class SpyreCBError(Exception):
    """Base class of every error spyre_cb raises on purpose."""


class InvalidRequestError(SpyreCBError, ValueError):
    """A request was refused; the engine state is unchanged and other requests go on."""


class ConfigError(SpyreCBError, ValueError):
    """The engine cannot be built with these limits or this model."""


class UnknownRequestError(SpyreCBError, KeyError):
    """No unfinished request has this id."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class BackendUnavailableError(SpyreCBError, RuntimeError):
    """The requested backend's software stack is not installed here."""


class SchedulerStateError(SpyreCBError, RuntimeError):
    """A call broke the schedule -> execute -> update protocol."""


__all__ = [
    "SpyreCBError",
    "InvalidRequestError",
    "ConfigError",
    "UnknownRequestError",
    "BackendUnavailableError",
    "SchedulerStateError",
]
