"""The exceptions spyre_cb raises. Every one derives from :class:`SpyreCBError`.

The classes are defined by the native module (``spyre_cb._core``), so the Rust
core raises these very classes across the PyO3 boundary; callers never see a
panic or a bare ``Exception``. Each also derives from the builtin a caller
would catch for that kind of failure:

- :class:`InvalidRequestError` (``ValueError``): a request was refused; the
  engine state is unchanged and other requests go on.
- :class:`ConfigError` (``ValueError``): impossible limits or model.
- :class:`UnknownRequestError` (``KeyError``): no unfinished request has this id.
- :class:`BackendUnavailableError` (``RuntimeError``): the backend's stack is not installed.
- :class:`SchedulerStateError` (``RuntimeError``): the schedule -> update
  protocol was broken, or the scheduler hit an internal error and must be rebuilt.
- :class:`ExecutorError` (``RuntimeError``): a tensor-parallel worker did not
  start, died or timed out; the engine has shut its workers down.
- :class:`EngineDeadError` (an ``ExecutorError``): an :class:`~spyre_cb.async_engine.AsyncEngine`
  met an error it cannot recover from (its executor failed); it takes no
  more requests and every open stream ends with this error.
"""

from __future__ import annotations

from spyre_cb._core import (
    BackendUnavailableError,
    ConfigError,
    ExecutorError,
    InvalidRequestError,
    SchedulerStateError,
    SpyreCBError,
    UnknownRequestError,
)


class EngineDeadError(ExecutorError):
    """The engine stopped for good (a tensor-parallel worker died, a step's executor
    failed): no request can run any more. The message says what broke."""


__all__ = [
    "SpyreCBError",
    "InvalidRequestError",
    "ConfigError",
    "UnknownRequestError",
    "BackendUnavailableError",
    "SchedulerStateError",
    "ExecutorError",
    "EngineDeadError",
]
