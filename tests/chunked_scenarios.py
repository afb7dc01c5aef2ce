"""The 19 published chunked-prefill scenarios, loaded from ``data/chunked_prefill_steps.json``.

15 are scheduler scenarios (step expectations), 4 are model-runner facts.
An unlisted step is the previous listed one with tkv + 1, everything else
unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data" / "chunked_prefill_steps.json"


@dataclass(frozen=True)
class ChunkedScenario:
    name: str
    kind: str
    config: dict[str, Any]
    requests: list[dict[str, Any]]
    checked_steps: list[dict[str, Any]]
    runner_steps: list[dict[str, Any]]
    counters: dict[str, int]

    @property
    def options(self) -> dict[str, Any]:
        """The scheduler options as keywords of simulate / Engine."""
        return dict(self.config, policy="chunked")

    def sim_requests(self) -> list[dict[str, Any]]:
        keys = ("id", "arrival_step", "prompt_token_ids", "max_tokens", "output_token_ids")
        return [{k: r[k] for k in keys} for r in self.requests]

    def expected_steps(self) -> list[dict[str, Any]]:
        """Every step from 0 to the last listed one."""
        out: list[dict[str, Any]] = []
        for listed in self.checked_steps:
            rec = dict(listed)
            rec.setdefault("finished_requests", [])
            if "block_ref_count" in rec:
                rec["block_ref_count"] = {int(k): v for k, v in rec["block_ref_count"].items()}
            if out:
                prev = out[-1]
                for s in range(prev["step"] + 1, rec["step"]):
                    assert prev["finished_requests"] == []
                    out.append(dict(prev, step=s, tkv=prev["tkv"] + s - prev["step"]))
            out.append(rec)
        return out


def _load() -> list[ChunkedScenario]:
    doc = json.loads(DATA.read_text())
    return [
        ChunkedScenario(
            name=s["name"],
            kind=s["kind"],
            config=s["config"],
            requests=s["requests"],
            checked_steps=s.get("checked_steps", []),
            runner_steps=s.get("runner_steps", []),
            counters=s.get("counters", {}),
        )
        for s in doc["scenarios"]
    ]


ALL = _load()
SCHEDULER = [s for s in ALL if s.kind == "scheduler_steps"]
RUNNER = [s for s in ALL if s.kind == "model_runner"]
SCHEDULER_IDS = [s.name for s in SCHEDULER]


def compare(record: Any, expected: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The listed keys whose values differ: {key: (got, expected)}. Slot mappings
    are compared where the published harness compares them: with block tables."""
    got = record.to_dict()
    got["prefill_slot_mappings"] = record.prefill_slot_mappings
    diff = {}
    for key, want in expected.items():
        if key == "prefill_slot_mappings" and "block_tables" not in expected:
            continue
        if got[key] != want:
            diff[key] = (got[key], want)
    return diff
