"""The step plan on the wire, for tensor-parallel ranks.

Workers need only a plan's numbers, not its ids. A plan travels as two
broadcasts: a fixed header of int64 values, then one int64 payload with its
arrays end to end (benches/tp_broadcast.py: ~20 % cheaper than one pickled
object per step). Both are derived from each plan class's ``FIELDS`` (the
core declares every field once): the header holds the plan's kind, then, in
field order, each scalar's value, each id list's count, each array's length
and each table's rows and columns; the payload holds the arrays' values in
the same order. A new plan field is on the wire without a change here.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import numpy as np
import torch

from spyre_cb.plan import ChunkPlan, DecodePlan, ForwardPlan, PrefillPlan

#: The plan classes that travel, by wire code; the stop message is ``len(PLANS)``.
PLANS: tuple[type[PrefillPlan] | type[DecodePlan] | type[ChunkPlan], ...] = (PrefillPlan, DecodePlan, ChunkPlan)
_STOP = len(PLANS)

#: Header values each field kind takes.
_HEADER_SLOTS = {"int": 1, "bool": 1, "id": 0, "ids": 1, "array": 1, "table": 2}

#: Header length: the kind, the largest plan's field values, all_positions, payload size.
HEADER_LEN = 1 + max(sum(_HEADER_SLOTS[kind] for _, kind in cls.FIELDS) for cls in PLANS) + 2


def pack_plan(plan: ForwardPlan | None, all_positions: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(header, payload) of a plan; ``None`` packs the stop message."""
    header = [0] * HEADER_LEN
    if plan is None:
        header[0] = _STOP
        return torch.tensor(header, dtype=torch.int64), torch.empty(0, dtype=torch.int64)
    header[0] = PLANS.index(type(plan))
    at = 1
    arrays: list[np.ndarray] = []
    for name, kind in plan.FIELDS:
        value = getattr(plan, name)
        if kind in ("int", "bool"):
            header[at] = int(value)
        elif kind == "ids":
            header[at] = len(value)
        elif kind == "array":
            header[at] = len(value)
            arrays.append(value)
        elif kind == "table":
            header[at], header[at + 1] = value.shape
            arrays.append(value.reshape(-1))
        at += _HEADER_SLOTS[kind]
    payload = torch.from_numpy(np.concatenate(arrays)) if arrays else torch.empty(0, dtype=torch.int64)
    header[-2] = int(all_positions)
    header[-1] = payload.numel()
    return torch.tensor(header, dtype=torch.int64), payload


def unpack_plan(header: torch.Tensor, payload: torch.Tensor) -> tuple[ForwardPlan | None, bool]:
    """The plan (ids left blank) and ``all_positions`` of a packed plan; ``None`` for stop."""
    h = header.tolist()
    if h[0] == _STOP:
        return None, False
    cls = PLANS[h[0]]
    data = payload.numpy()
    at, offset = 1, 0
    args: list[object] = []
    for _, kind in cls.FIELDS:
        if kind == "int":
            args.append(h[at])
        elif kind == "bool":
            args.append(bool(h[at]))
        elif kind == "id":
            args.append("")
        elif kind == "ids":
            args.append(("",) * h[at])
        elif kind in ("array", "table"):
            n = h[at] if kind == "array" else h[at] * h[at + 1]
            if offset + n > len(data):
                raise ValueError(f"plan payload has {len(data)} values, its fields take more than {offset + n}")
            values = data[offset : offset + n]
            args.append(values if kind == "array" else values.reshape(h[at], h[at + 1]))
            offset += n
        at += _HEADER_SLOTS[kind]
    if offset != len(data):
        raise ValueError(f"plan payload has {len(data)} values, its fields take {offset}")
    return cls(*args), bool(h[-2])


#: How long a rank > 0 waits for the next plan. An idle engine sends none, so the
#: plans travel on a group of their own with this timeout (the model's collectives
#: keep ``tp_timeout_s``); a rank that dies still breaks the wait at once (its
#: connections close). 20 days: gloo keeps timeouts in milliseconds.
PLAN_WAIT = timedelta(days=20)
_channel: Any = None


def open_plan_channel(timeout: timedelta) -> None:
    """Every rank, right after the process group is made (a collective call): the
    group the plans travel on. It is made within ``timeout`` (a rank that died
    meanwhile fails it then, not after ``PLAN_WAIT``), then waits ``PLAN_WAIT``."""
    global _channel
    _channel = torch.distributed.new_group(timeout=timeout)
    torch.distributed.distributed_c10d._set_pg_timeout(PLAN_WAIT, _channel)


def broadcast_plan(plan: ForwardPlan | None, all_positions: bool = False) -> None:
    """Rank 0: sends a plan (or the stop message, ``None``) to every rank."""
    header, payload = pack_plan(plan, all_positions)
    torch.distributed.broadcast(header, src=0, group=_channel)
    if payload.numel():
        torch.distributed.broadcast(payload, src=0, group=_channel)


def receive_plan() -> tuple[ForwardPlan | None, bool]:
    """Ranks > 0: the next plan from rank 0 (``None``: stop)."""
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    torch.distributed.broadcast(header, src=0, group=_channel)
    payload = torch.empty(int(header[-1]), dtype=torch.int64)
    if payload.numel():
        torch.distributed.broadcast(payload, src=0, group=_channel)
    return unpack_plan(header, payload)
