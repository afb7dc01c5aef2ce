"""Workloads for simulation: load them from JSON/JSONL or generate them."""

from __future__ import annotations

import json
from pathlib import Path

from spyre_cb import _core
from spyre_cb.errors import InvalidRequestError

Request = tuple[int, int, int]  # (arrival_step, prompt_len, max_tokens)


def _one(item: object, where: str) -> Request:
    if isinstance(item, dict):
        try:
            item = (item.get("arrival_step", item.get("arrival", 0)), item["prompt_len"], item["max_tokens"])
        except KeyError as e:
            raise InvalidRequestError(f"{where}: missing key {e.args[0]!r} (need prompt_len, max_tokens)") from None
    if not isinstance(item, (list, tuple)) or len(item) != 3:
        raise InvalidRequestError(
            f"{where}: a request is [arrival_step, prompt_len, max_tokens] or an object with those keys, got {item!r}"
        )
    out = []
    for name, v in zip(("arrival_step", "prompt_len", "max_tokens"), item):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise InvalidRequestError(f"{where}: {name} must be an int >= 0, got {v!r}")
        out.append(v)
    return tuple(out)  # type: ignore[return-value]


def load_workload(path: str | Path) -> list[Request]:
    """Reads a JSON list (or JSONL, one request per line) of requests.

    A request is ``[arrival_step, prompt_len, max_tokens]`` or
    ``{"arrival_step": .., "prompt_len": .., "max_tokens": ..}``.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise InvalidRequestError(f"cannot read workload {str(p)!r}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise InvalidRequestError(f"{p}: not a text file (expected JSON or JSONL)") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None  # not one JSON document: read it as JSONL
    except RecursionError:
        raise InvalidRequestError(f"{p}: JSON nested too deeply to be a workload") from None
    if isinstance(data, list) and not all(isinstance(x, (list, dict)) for x in data):
        data = [data]  # a single request on its own
    if isinstance(data, dict):
        data = [data]
    if data is not None:
        if not isinstance(data, list):
            raise InvalidRequestError(f"{p}: expected a list of requests, got {type(data).__name__}")
        return [_one(x, f"{p}[{i}]") for i, x in enumerate(data)]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except RecursionError:
            raise InvalidRequestError(f"{p}:{n}: JSON nested too deeply to be a request") from None
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"{p}:{n}: not valid JSON ({e})") from None
        out.append(_one(item, f"{p}:{n}"))
    return out


def synthetic_workload(
    n: int,
    *,
    seed: int = 0,
    max_model_len: int = 2048,
    mean_interarrival: float = 4.0,
    prompt_median: float = 200.0,
    tokens_median: float = 100.0,
    sigma: float = 1.0,
    prompt_range: tuple[int, int] | None = None,
    tokens_range: tuple[int, int] | None = None,
) -> list[Request]:
    """``n`` requests with Poisson arrivals and log-normal lengths.

    Prompt lengths and max_tokens are log-normal around their medians (shape
    ``sigma``), or uniform in ``prompt_range`` / ``tokens_range`` when given,
    clipped so that every request fits ``max_model_len``. Deterministic for a
    given seed, on every machine: the generator is the Rust core's, the same
    one the criterion benches and the long run use.
    """
    return _core.synthetic_workload(
        n,
        seed=seed,
        max_model_len=max_model_len,
        mean_interarrival=mean_interarrival,
        prompt_median=prompt_median,
        tokens_median=tokens_median,
        sigma=sigma,
        prompt_range=prompt_range,
        tokens_range=tokens_range,
    )
