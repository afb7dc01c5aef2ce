"""The server's own options (the engine's are :class:`~spyre_cb.EngineConfig`):
one dataclass, from which ``spyre-cb serve``'s flags are generated, so an
option is declared once."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from spyre_cb.config import cli_fields, nonneg_int
from spyre_cb.errors import ConfigError

#: The text formats of tool calls ``--tool-call-parser`` knows (``spyre_cb.server.tools``).
TOOL_CALL_PARSERS = ("hermes", "granite")


def _opt(default: Any, help: str, *, flag: str | None = None, choices: tuple[str, ...] = (), metavar: str = "") -> Any:
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "metavar": metavar})


@dataclass(frozen=True)
class ServerOptions:
    """How ``spyre-cb serve`` / :func:`~spyre_cb.server.serve` serves an engine."""

    host: str = _opt("127.0.0.1", "address to listen on (default: loopback only)")
    port: int = _opt(8000, "port to listen on", metavar="N")
    api_key: str | None = _opt(None, "require 'Authorization: Bearer KEY' on /v1/ routes", metavar="KEY")
    max_waiting: int | None = _opt(
        None, "answer 503 while this many sequences wait (counting every prompt x n)", metavar="N"
    )
    served_model_name: str | None = _opt(None, "the model name clients use (default: MODEL)", metavar="NAME")
    log_level: str = _opt("warning", "uvicorn's log level", choices=("critical", "error", "warning", "info", "debug"))
    shutdown_timeout_s: int = _opt(
        10,
        "on SIGTERM/SIGINT, let requests in flight finish for up to S seconds, then abort them",
        flag="--shutdown-timeout",
        metavar="S",
    )
    access_log: bool = _opt(True, "one JSON line per /v1/ request on stderr (logger spyre_cb.access)")
    disable_any_whitespace: bool = _opt(
        False,
        "JSON output constraints (response_format, tools, guided_json) allow no free whitespace between JSON "
        "tokens unless a request's structured_outputs says otherwise (vLLM's structured-outputs option: "
        "a weak model may otherwise emit whitespace until max_tokens)",
    )
    enable_auto_tool_choice: bool = _opt(
        False, 'allow tool_choice "auto" (the default with tools): the model\'s text is parsed into tool calls'
    )
    tool_call_parser: str | None = _opt(
        None, "the text format of the model's tool calls (with --enable-auto-tool-choice)", choices=TOOL_CALL_PARSERS
    )

    data_parallel_size: int = _opt(
        1,
        "engine replicas behind this server, each its own process(es) with an equal share of the CPUs and its "
        "own KV cache (with --tensor-parallel-size M: M ranks each)",
        metavar="N",
    )
    router: str = _opt(
        "least-loaded",
        "how a data-parallel server picks a replica: the fewest outstanding sequences, in turn, or (with "
        "--policy chunked --prefix-caching) where the prompt's prefix was sent within 4 sequences of the least loaded",
        choices=("least-loaded", "round-robin", "prefix-affinity"),
    )
    max_replica_restarts: int = _opt(
        3, "times a data-parallel replica that died is restarted (with a back-off) before it stays down", metavar="N"
    )

    def __post_init__(self) -> None:
        if self.data_parallel_size < 1:
            raise ConfigError(f"data_parallel_size must be >= 1, got {self.data_parallel_size}")
        if self.router not in ("least-loaded", "round-robin", "prefix-affinity"):
            raise ConfigError(f"router must be least-loaded, round-robin or prefix-affinity, got {self.router!r}")
        for name in ("port", "shutdown_timeout_s", "max_replica_restarts"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_waiting is not None and self.max_waiting < 0:
            raise ConfigError(f"max_waiting must be >= 0 or None, got {self.max_waiting}")
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ConfigError(
                f"tool_call_parser must be one of {', '.join(TOOL_CALL_PARSERS)}, got {self.tool_call_parser!r}"
            )
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ConfigError(f"enable_auto_tool_choice needs tool_call_parser (one of {', '.join(TOOL_CALL_PARSERS)})")

    @property
    def auto_tool_parser(self) -> str | None:
        """The parser of ``tool_choice: "auto"`` calls (None: "auto" is refused)."""
        return self.tool_call_parser if self.enable_auto_tool_choice else None

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        """One ``--flag`` per option, with its help and default."""
        group = parser.add_argument_group("server options")
        for f in dataclasses.fields(cls):
            meta, default = f.metadata, f.default
            flag = meta["flag"] or "--" + f.name.replace("_", "-")
            suffix = "" if default is None or f.type == "bool" else f" (default: {default})"
            kw: dict[str, Any] = dict(default=default, help=f"{meta['help']}{suffix}", dest=f.name)
            if f.type == "bool":
                kw["action"] = argparse.BooleanOptionalAction
                kw["help"] = f"{meta['help']} (default: {'on' if default else 'off'})"
            elif meta["choices"]:
                kw["choices"] = meta["choices"]
            elif f.type in ("int", "int | None"):
                kw["type"] = nonneg_int
            if meta["metavar"]:
                kw["metavar"] = meta["metavar"]
            group.add_argument(flag, **kw)

    @classmethod
    def from_cli(cls, args: argparse.Namespace, **overrides: Any) -> ServerOptions:
        return cls(**cli_fields(cls, args, overrides))


__all__ = ["ServerOptions", "TOOL_CALL_PARSERS"]
