"""The 12 published step-trace scenarios, loaded from ``data/scheduler_steps.json``.

Each scenario lists some steps; the steps between two listed ones are plain
decode steps: the earlier listed record with tkv advanced by one per step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DATA = Path(__file__).parent / "data" / "scheduler_steps.json"

KEYS = (
    "step",
    "tkv",
    "waiting",
    "running",
    "request_outputs",
    "finished_requests",
    "n_reserved_blocks",
    "n_used_blocks",
)


@dataclass(frozen=True)
class Scenario:
    name: str
    max_num_seqs: int
    max_model_len: int
    available_blocks: int | None
    max_batch_tkv_limit: int | None
    prompt_lens: list[int]
    max_tokens: list[int]
    arrivals: list[int]
    checked_steps: list[dict]

    @property
    def requests(self) -> list[tuple[int, int, int]]:
        return list(zip(self.arrivals, self.prompt_lens, self.max_tokens))

    @property
    def limits(self) -> dict:
        return dict(
            max_num_seqs=self.max_num_seqs,
            max_model_len=self.max_model_len,
            available_blocks=self.available_blocks,
            max_batch_tkv_limit=self.max_batch_tkv_limit,
        )

    def expected_steps(self) -> list[dict]:
        """Every step's record: listed ones plus the decode steps between them."""
        out: list[dict] = []
        for listed in self.checked_steps:
            rec = {k: listed.get(k, []) for k in KEYS}
            if out:
                prev = out[-1]
                gap = range(prev["step"] + 1, rec["step"])
                if gap:
                    # Only a plain decode step can be extrapolated.
                    assert not prev["finished_requests"] and prev["request_outputs"] == prev["running"], (
                        self.name,
                        prev["step"],
                    )
                for s in gap:
                    out.append(dict(prev, step=s, tkv=prev["tkv"] + s - prev["step"]))
            out.append(rec)
        return out


def load() -> list[Scenario]:
    data = json.loads(DATA.read_text())
    return [Scenario(**s) for s in data["scenarios"]]


SCENARIOS = load()
IDS = [s.name for s in SCENARIOS]
