"""The tensor-parallel wire format is derived from each plan's field list:
every field of every plan kind round-trips (ids travel as blanks), and a
field the class has but does not declare would fail here."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import spyre_cb
from spyre_cb.plan import ChunkPlan, DecodePlan, IdlePlan, PrefillPlan
from spyre_cb.wire import HEADER_LEN, PLANS, pack_plan, unpack_plan

# attributes a plan computes from its fields (not sent)
DERIVED = {"kind", "FIELDS", "input_len", "tkv", "request_ids"}


def _prompt(n: int, seed: int) -> list[int]:
    return [(7 * seed + j) % 100 + 1 for j in range(n)]


def _plans_of(scheduler: spyre_cb.Scheduler, prompts: list[list[int]], max_tokens: int, steps: int) -> list[object]:
    for i, prompt in enumerate(prompts):
        scheduler.add_request(str(i), prompt, max_tokens)
    out = []
    for _ in range(steps):
        p = scheduler.schedule()
        out.append(p)
        scheduler.update([5] * len(p.request_ids))
    return out


def _assert_same(p: object, q: object, ids_blank: bool = True) -> None:
    assert type(q) is type(p)
    for name, kind in type(p).FIELDS:
        a, b = getattr(p, name), getattr(q, name)
        if kind == "id":
            assert b == ("" if ids_blank else a)
        elif kind == "ids":
            assert b == (("",) * len(a) if ids_blank else a)
        elif kind in ("array", "table"):
            assert b.dtype == np.int64 and b.shape == a.shape and np.array_equal(a, b), name
        else:
            assert type(b) is type(a) and b == a, name


@pytest.mark.parametrize("cls", [PrefillPlan, DecodePlan, ChunkPlan, IdlePlan])
def test_fields_declare_every_attribute(cls: type) -> None:
    public = {n for n in dir(cls) if not n.startswith("_")}
    declared = {name for name, _ in cls.FIELDS}
    assert declared <= public
    assert public - declared <= DERIVED, f"{cls.__name__}: attributes not in FIELDS: {public - declared - DERIVED}"
    assert all(kind in ("int", "bool", "id", "ids", "array", "table") for _, kind in cls.FIELDS)


def test_every_field_of_every_plan_round_trips() -> None:
    plans = _plans_of(spyre_cb.Scheduler(3, 512), [_prompt(n, n) for n in (50, 140, 230)], 30, 12)
    chunked = spyre_cb.Scheduler(2, 512, policy="chunked", chunk_size=64, prefix_caching=True)
    # the second prompt repeats the first: its last chunk runs after a prefix hit
    plans += _plans_of(chunked, [_prompt(150, 1), _prompt(150, 1), _prompt(40, 2)], 8, 20)
    seen = set()
    for p in plans:
        if p.kind == "idle":
            continue
        for all_positions in (False, True):
            header, payload = pack_plan(p, all_positions)
            assert header.shape == (HEADER_LEN,)
            q, flag = unpack_plan(header, payload)
            assert flag is all_positions
            _assert_same(p, q)
        # the constructor takes the fields in FIELDS order, and pickling uses it
        _assert_same(p, type(p)(*(getattr(p, n) for n, _ in p.FIELDS)), ids_blank=False)
        q = pickle.loads(pickle.dumps(p))
        assert q.request_ids == p.request_ids
        seen.add((p.kind, getattr(p, "is_last", None), getattr(p, "cached_blocks", 0) > 0))
    assert {k for k, _, _ in seen} == {"prefill", "decode", "chunk"}
    assert ("chunk", True, True) in seen, "a last chunk after a prefix hit"
    assert unpack_plan(*pack_plan(None)) == (None, False)
    assert {type(p) for p in plans if p.kind != "idle"} == set(PLANS)


def test_keyword_construction_and_a_short_payload() -> None:
    p = PrefillPlan(
        request_id="r",
        tkv=64,
        tkv_shift=0,
        new_batch=True,
        prompt_len=3,
        left_padding=61,
        right_padding=0,
        logits_index=63,
        input_ids=[0] * 61 + [1, 2, 3],
        positions=[0] * 61 + [0, 1, 2],
        slot_mapping=list(range(64, 128)),
        block_table=[1],
        block_copies=[[1, 2]],
    )
    q, _ = unpack_plan(*pack_plan(p))
    assert q is not None and q.block_copies.tolist() == [[1, 2]]
    header, payload = pack_plan(p)
    with pytest.raises(ValueError, match="payload"):
        unpack_plan(header, payload[:-1])
    with pytest.raises(TypeError, match="tkv must be an int"):
        PrefillPlan(*(getattr(p, n) if n != "tkv" else "x" for n, _ in p.FIELDS))
