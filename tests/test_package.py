"""Packaging promises: typed stubs match the native module, plans are plain picklable data."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import numpy as np

import spyre_cb
from spyre_cb import _core
from spyre_cb.plan import DecodePlan, PrefillPlan

PKG = Path(spyre_cb.__file__).parent


def stub_names() -> dict[str, set[str]]:
    tree = ast.parse((PKG / "_core.pyi").read_text())
    out: dict[str, set[str]] = {"": set()}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            out[""].add(node.name)
            out[node.name] = {
                n.target.id if isinstance(n, ast.AnnAssign) else n.name
                for n in node.body
                if isinstance(n, (ast.FunctionDef, ast.AnnAssign))
            }
        elif isinstance(node, ast.FunctionDef):
            out[""].add(node.name)
        elif isinstance(node, ast.AnnAssign):
            out[""].add(node.target.id)
        elif isinstance(node, ast.Assign):  # an alias (ChunkedTrace = Trace)
            out[""].update(t.id for t in node.targets if isinstance(t, ast.Name) and not t.id.startswith("_"))
    return out


def public(obj) -> set[str]:
    return {n for n in dir(obj) if not n.startswith("_")}


def test_stubs_match_the_native_module():
    stubs = stub_names()
    assert public(_core) | {"__version__"} >= stubs[""] - {"__version__"}
    assert public(_core) <= stubs[""] | {"__version__"}
    for cls in ("Scheduler", "StepRecord"):
        assert public(getattr(_core, cls)) == {n for n in stubs[cls] if not n.startswith("_")}, cls


def test_py_typed_is_shipped():
    assert (PKG / "py.typed").exists()


def test_plans_pickle_as_plain_data():
    s = spyre_cb.Scheduler(max_num_seqs=2, max_model_len=192)
    s.add_request("a", [3] * 49, 10)
    s.add_request("b", [4] * 70, 4)
    plans = []
    for tokens in ([1], [2], [5, 6]):
        plans.append(s.schedule())
        s.update(tokens)
    assert isinstance(plans[0], PrefillPlan) and isinstance(plans[2], DecodePlan)
    assert plans[1].tkv_shift == 64 and plans[1].tkv == 128
    for p in plans:
        q = pickle.loads(pickle.dumps(p))
        assert type(q) is type(p)
        for a, b in zip(p.__reduce__()[1], q.__reduce__()[1], strict=True):
            assert np.array_equal(a, b), (p, a, b)
    d = plans[2]
    # b joined with a shift: a gained a fully padded block, which is not in its table
    assert d.request_ids == ("b", "a") and d.positions.tolist() == [70, 49] and d.tkv == 128
    assert d.current_tkv.tolist() == [129, 65] and d.left_padding.tolist() == [58, 15]
    assert (d.block_table != 0).sum(axis=1).tolist() == [3, 2] and d.block_table[1][2] == 0
    assert d.input_ids.dtype == np.int64 and d.block_table.shape == (2, 3)
    p = plans[0]
    assert p.logits_index == p.left_padding + p.prompt_len - 1 and p.input_len == 64
