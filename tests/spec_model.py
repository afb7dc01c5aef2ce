"""A plain-Python specification of the scheduling policy, written from
docs/design.md (not from the Rust code). It is slow and simple on purpose: the
oracle of the differential tests and the baseline of the Rust-vs-Python
benchmark. Blocks are counted, not named.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

BLOCK = 64


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Req:
    id: str
    prompt_len: int
    max_tokens: int
    generated: int = 0
    left_pad: int = 0  # tkv - tokens held, fully padded blocks included
    reserved: int = 0
    used: int = 0


class SpecScheduler:
    def __init__(self, max_num_seqs, max_model_len, available_blocks=None, max_batch_tkv_limit=None):
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.n_blocks = available_blocks if available_blocks is not None else max_num_seqs * max_model_len // BLOCK
        self.limit = max_batch_tkv_limit if max_batch_tkv_limit is not None else max_model_len * max_num_seqs
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []  # most recently admitted first
        self.to_free: list[Req] = []
        self.tkv = 0
        self.step_no = 0
        self.outputs: list[str] = []
        self.finished: list[str] = []

    # -- the rules --------------------------------------------------------

    def start_tkv(self, prompt_len, max_tokens):
        """tkv of a fresh batch: the prompt rounded up to a block, if that leaves room."""
        aligned = ceil_div(prompt_len, BLOCK) * BLOCK
        return prompt_len if aligned + max_tokens > self.max_model_len else aligned

    @staticmethod
    def reservation(tkv, prompt_len, max_tokens):
        return ceil_div(tkv + max_tokens - 1, BLOCK) - (tkv - prompt_len) // BLOCK

    def is_valid(self, prompt_len, max_tokens):
        if prompt_len < 1 or max_tokens < 1 or prompt_len + max_tokens > self.max_model_len:
            return False
        start = self.start_tkv(prompt_len, max_tokens)
        return self.reservation(start, prompt_len, max_tokens) <= self.n_blocks and start + max_tokens - 1 <= self.limit

    def free_blocks(self):
        return self.n_blocks - sum(r.reserved for r in self.running + self.to_free)

    def admit_tkv(self, req):
        """The tkv the batch would have with `req` prefilled, or None if it may not join."""
        if not self.running:
            return self.start_tkv(req.prompt_len, req.max_tokens)
        if len(self.running) >= self.max_num_seqs:  # condition 1 (condition 2: one prefill a step)
            return None
        shift = ceil_div(req.prompt_len - self.tkv, BLOCK) * BLOCK if req.prompt_len > self.tkv else 0
        new_tkv = self.tkv + shift
        room = self.max_model_len - new_tkv
        if req.max_tokens > room:  # condition 3
            return None
        if shift and any(r.max_tokens - r.generated > room for r in self.running):
            return None
        if self.reservation(new_tkv, req.prompt_len, req.max_tokens) > self.free_blocks():  # condition 4
            return None
        end_new = new_tkv + req.max_tokens - 1  # condition 5: staircase of batch x tkv
        ends = sorted(new_tkv + r.max_tokens - r.generated for r in self.running)
        batch = len(self.running) + 1
        peak = 0
        for end in ends:
            if end >= end_new:
                break
            peak = max(peak, batch * end)
            batch -= 1
        peak = max(peak, batch * end_new)
        return new_tkv if peak <= self.limit else None

    # -- the protocol -------------------------------------------------------

    def add(self, rid, prompt_len, max_tokens):
        if not self.is_valid(prompt_len, max_tokens):
            return False
        self.waiting.append(Req(rid, prompt_len, max_tokens))
        return True

    def step(self):
        self.step_no += 1
        self.outputs, self.finished = [], []
        self.to_free = []  # blocks of last step's finished requests go back
        if not self.running:
            self.tkv = 0
        else:  # drop whole blocks of left padding common to all
            cut = min(r.left_pad // BLOCK for r in self.running) * BLOCK
            for r in self.running:
                r.left_pad -= cut
            self.tkv -= cut
        new_tkv = self.admit_tkv(self.waiting[0]) if self.waiting else None
        if new_tkv is not None:
            req = self.waiting.popleft()
            shift = new_tkv - self.tkv if self.running else 0
            for r in self.running:  # the batch moves right by whole blocks
                r.left_pad += shift
            self.tkv = new_tkv
            req.left_pad = new_tkv - req.prompt_len
            req.reserved = self.reservation(new_tkv, req.prompt_len, req.max_tokens)
            req.used = ceil_div(new_tkv, BLOCK) - req.left_pad // BLOCK
            self.running.insert(0, req)
            self.emit([req])
        elif self.running:
            if self.tkv % BLOCK == 0:  # everyone writes into a new block
                for r in self.running:
                    r.used += 1
            self.tkv += 1
            self.emit(list(self.running))
        else:
            self.tkv = 0

    def emit(self, reqs):
        for r in reqs:
            r.generated += 1
            self.outputs.append(r.id)
            if r.generated == r.max_tokens:
                self.finished.append(r.id)
                self.running.remove(r)
                self.to_free.append(r)

    def observe(self):
        held = self.running + self.to_free
        return {
            "step": self.step_no,
            "tkv": self.tkv,
            "waiting": [r.id for r in self.waiting],
            "running": [r.id for r in self.running],
            "request_outputs": list(self.outputs),
            "finished_requests": list(self.finished),
            "n_reserved_blocks": sum(r.reserved for r in held),
            "n_used_blocks": sum(r.used for r in held),
        }

    def drained(self):
        return not self.waiting and not self.running and not self.to_free and self.tkv == 0


def simulate(requests, max_num_seqs, max_model_len, available_blocks=None, max_batch_tkv_limit=None):
    """Full trace (list of dicts) and the ids of rejected requests."""
    s = SpecScheduler(max_num_seqs, max_model_len, available_blocks, max_batch_tkv_limit)
    order = sorted(range(len(requests)), key=lambda i: requests[i][0])
    trace, rejected, k, n = [], [], 0, 0
    while True:
        if n > 0:
            s.step()
        while k < len(order) and requests[order[k]][0] <= n:
            i = order[k]
            if not s.add(str(i), requests[i][1], requests[i][2]):
                rejected.append(str(i))
            k += 1
        trace.append(s.observe())
        if k == len(order) and s.drained():
            return trace, rejected
        n += 1
