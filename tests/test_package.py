"""Packaging promises: typed stubs match the native module, plans are plain picklable data."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import spyre_cb
from spyre_cb import _core
from spyre_cb.plan import DecodePlan, PrefillPlan, plan_from_dict

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
        plans.append(plan_from_dict(s.schedule()))
        s.update(tokens)
    assert isinstance(plans[0], PrefillPlan) and isinstance(plans[2], DecodePlan)
    assert plans[1].tkv_shift == 64 and plans[1].tkv == 128
    for p in plans:
        assert pickle.loads(pickle.dumps(p)) == p
    d = plans[2]
    # b joined with a shift: a gained a fully padded block, which is not in its table
    assert d.request_ids == ["b", "a"] and d.positions == [70, 49] and d.tkv == 128
    assert d.current_tkv == [129, 65] and d.left_padding == [58, 15]
    assert [sum(b != 0 for b in row) for row in d.block_table] == [3, 2] and d.block_table[1][2] == 0
