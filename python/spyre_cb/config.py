"""One configuration object for every entry point.

:class:`EngineConfig` holds every option an engine takes, each declared once
with its default, help text and command-line flag. ``Engine``, ``LLM`` and
the CLI all build one (the CLI's flags are generated from it), so a new
option is added here and nowhere else. Its scheduling fields are resolved by
the Rust core into a :class:`~spyre_cb._core.SchedulerConfig` (defaults
filled, limits checked) exactly once, at construction.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from spyre_cb._core import SchedulerConfig
from spyre_cb.errors import ConfigError

BACKENDS = ("eager", "inductor", "sendnn")
ATTENTION_OPS = ("native", "vectorized", "fms")
DTYPES = ("float32", "bfloat16", "float16")
LINEAR_OPS = ("auto", "native", "onednn", "torch")
DISTRIBUTED = ("gloo", "nccl")
POLICIES = ("continuous", "chunked")


def _opt(default: Any, help: str, *, choices: tuple[str, ...] | None = None, scheduler: bool = False) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, "scheduler": scheduler})


@dataclass(frozen=True)
class EngineConfig:
    """Every option of an engine; frozen, validated at construction."""

    model: str = _opt(
        "tiny", "Hugging Face checkpoint directory, or 'tiny' (the offline test model), 'tiny-embed' (its encoder)"
    )
    max_num_seqs: int = _opt(4, "most sequences in the decode batch", scheduler=True)
    max_model_len: int = _opt(
        512, "longest sequence (prompt + generated); a multiple of 64 under the continuous policy", scheduler=True
    )
    available_blocks: int | None = _opt(
        None, "usable KV blocks (default: max_num_seqs * max_model_len / 64)", scheduler=True
    )
    max_batch_tkv_limit: int | None = _opt(
        None, "largest batch x tkv (default: max_model_len * max_num_seqs)", scheduler=True
    )
    policy: str = _opt(
        "continuous",
        "scheduling policy: the published continuous batching, or chunked prefill with interleaving, "
        "decode pausing and prefix caching",
        choices=POLICIES,
        scheduler=True,
    )
    chunk_size: int = _opt(128, "prompt tokens per prefill chunk, a multiple of 64 (policy chunked)", scheduler=True)
    interleave: bool = _opt(True, "run a decode step between two prefill chunks (policy chunked)", scheduler=True)
    decode_pausing: bool = _opt(
        True, "pause decodes that would exceed max_batch_tkv_limit instead of refusing (policy chunked)", scheduler=True
    )
    prefix_caching: bool = _opt(False, "reuse prompt blocks already in the KV cache (policy chunked)", scheduler=True)
    backend: str = _opt("eager", "eager or inductor on CPU; sendnn on an IBM Spyre AIU", choices=BACKENDS)
    attention_ops: str = _opt(
        "native",
        "paged attention ops: native (decodes read the KV blocks in place, a Rust kernel), vectorized "
        "(torch gather + SDPA), or FMS's reference ops",
        choices=ATTENTION_OPS,
    )
    dtype: str = _opt("float32", "weights and KV cache dtype", choices=DTYPES)
    linear_ops: str = _opt(
        "auto",
        "linear layers: native (this project's kernel on weights packed once at load; bfloat16 needs "
        "AVX512_BF16, float32 AVX-512F; decodes read the weights up to 1.8x faster than onednn), onednn "
        "(weights prepacked once at load for oneDNN), torch (F.linear as stored), or auto (with the eager "
        "backend: native where this CPU runs it for the dtype, else onednn where it runs, else torch)",
        choices=LINEAR_OPS,
    )
    num_threads: int | None = _opt(
        None,
        "torch intra-op threads of each rank (default: the CPUs this process may use, by affinity mask and "
        "cgroup quota, shared among tensor-parallel ranks)",
    )
    seed: int = _opt(0, "base seed of sampled requests that give none")
    tensor_parallel_size: int = _opt(1, "ranks a step is split across (processes started by the engine)")
    distributed_backend: str = _opt("gloo", "torch.distributed backend of the ranks (gloo on CPU)", choices=DISTRIBUTED)
    tp_timeout_s: float = _opt(60.0, "seconds a tensor-parallel start-up or collective may take before it fails")
    allow_unverified_architectures: bool = _opt(
        False, "run a checkpoint whose architecture spyre_cb has not verified against transformers (with a warning)"
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ConfigError(f"{f.name} must be one of {', '.join(choices)}, got {value!r}")
        if not isinstance(self.model, str) and not hasattr(self.model, "__fspath__"):
            raise ConfigError(f"model must be a checkpoint directory path or 'tiny', got {type(self.model).__name__}")
        for name in ("allow_unverified_architectures", "interleave", "decode_pausing", "prefix_caching"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        if self.linear_ops in ("native", "onednn") and self.backend != "eager":
            raise ConfigError(
                f"linear_ops {self.linear_ops!r} runs with backend 'eager'; backend {self.backend!r} compiles the "
                "model's linear layers itself (use linear_ops 'auto' or 'torch')"
            )
        tp = self.tensor_parallel_size
        if isinstance(tp, bool) or not isinstance(tp, int) or not 1 <= tp <= 64:
            raise ConfigError(f"tensor_parallel_size must be an int in [1, 64], got {tp!r}")
        nt = self.num_threads
        if nt is not None and (isinstance(nt, bool) or not isinstance(nt, int) or not 1 <= nt <= 1024):
            raise ConfigError(f"num_threads must be None or an int in [1, 1024], got {nt!r}")
        t = self.tp_timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < 86_400:
            raise ConfigError(f"tp_timeout_s must be a number of seconds in (0, 86400), got {t!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be an int in [0, 2**63), got {self.seed!r}")
        # resolved once by the core: defaults filled in, limits checked
        object.__setattr__(self, "_scheduler", SchedulerConfig(**self.scheduler_kwargs()))

    @property
    def scheduler(self) -> SchedulerConfig:
        """The resolved scheduling limits."""
        sched: SchedulerConfig = self.__dict__["_scheduler"]
        return sched

    def scheduler_kwargs(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in SchedulerConfig.FIELDS}

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)

    def with_model_path(self) -> EngineConfig:
        """This config with ``model="tiny"`` (or ``"tiny-embed"``, the tiny encoder)
        replaced by the offline tiny checkpoint's directory (built once into
        ``$SPYRE_CB_CACHE``); any other model unchanged.

        The one place the names ``"tiny"`` and ``"tiny-embed"`` become directories: ``Engine`` (and so
        ``LLM``, the server and every CLI command) goes through it.
        """
        if self.model == "tiny":
            from spyre_cb.models import tiny_model_path

            return self.replace(model=str(tiny_model_path()))
        if self.model == "tiny-embed":
            from spyre_cb.models import tiny_embedding_model_path

            return self.replace(model=str(tiny_embedding_model_path()))
        return self

    @classmethod
    def from_kwargs(cls, config: EngineConfig | None = None, /, **kwargs: Any) -> EngineConfig:
        """``config`` with ``kwargs`` applied (unknown names are a ConfigError)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)}; options are {', '.join(sorted(names))}")
        if config is None:
            return cls(**kwargs)
        if not isinstance(config, EngineConfig):
            raise ConfigError(f"config must be an EngineConfig, got {type(config).__name__}")
        return dataclasses.replace(config, **kwargs) if kwargs else config

    # ----- command line ------------------------------------------------------

    @classmethod
    def add_cli_args(
        cls, parser: argparse.ArgumentParser, *, only_scheduler: bool = False, defaults: dict[str, Any] | None = None
    ) -> None:
        """Adds one ``--flag`` per option (``--max-num-seqs`` ...), with its help and default."""
        defaults = defaults or {}
        group = parser.add_argument_group("engine options" if not only_scheduler else "scheduler limits")
        for f in dataclasses.fields(cls):
            if only_scheduler and not f.metadata["scheduler"]:
                continue
            default = defaults.get(f.name, f.default)
            shown = "the offline tiny model" if f.name == "model" and default == "tiny" else default
            suffix = "" if default is None else f" (default: {shown})"  # None: the help says what it means
            kw: dict[str, Any] = dict(default=default, help=f"{f.metadata['help']}{suffix}", dest=f.name)
            if f.type == "bool":
                action = argparse.BooleanOptionalAction if default else "store_true"
                kw = dict(action=action, default=default, help=f.metadata["help"], dest=f.name)
            elif f.metadata["choices"]:
                kw["choices"] = f.metadata["choices"]
            elif f.type in ("int", "int | None"):
                kw["type"] = any_int  # the config's own checks name each option's limit
                kw["metavar"] = "N"
            elif f.type == "float":
                kw["type"] = float
                kw["metavar"] = "S"
            group.add_argument("--" + f.name.replace("_", "-"), **kw)

    @classmethod
    def from_cli(cls, args: argparse.Namespace, **overrides: Any) -> EngineConfig:
        return cls(**cli_fields(cls, args, overrides))

    @staticmethod
    def scheduler_from_cli(args: argparse.Namespace) -> SchedulerConfig:
        return SchedulerConfig(**{name: getattr(args, name) for name in SchedulerConfig.FIELDS})


def cli_fields(cls: Any, args: argparse.Namespace, overrides: dict[str, Any]) -> dict[str, Any]:
    """The parsed flags that are fields of the dataclass ``cls``, with ``overrides`` on top."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {**{k: v for k, v in vars(args).items() if k in names}, **overrides}


def any_int(text: str) -> int:
    """argparse type: an integer (its range is the option's to check and name)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def nonneg_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


__all__ = [
    "EngineConfig",
    "SchedulerConfig",
    "BACKENDS",
    "ATTENTION_OPS",
    "DTYPES",
    "LINEAR_OPS",
    "DISTRIBUTED",
    "POLICIES",
]
