"""Shared fixtures: one tiny offline checkpoint per session, HF greedy references."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from hypothesis import settings  # noqa: E402

# CI runs are reproducible (fixed example sequence); local runs explore new examples.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from spyre_cb.models import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "granite", seed=0)


@pytest.fixture(scope="session")
def hf_greedy(tiny_model):
    """``hf_greedy(prompt_ids, n)``: transformers' greedy continuation (EOS ignored)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    cache: dict[tuple, list[int]] = {}

    def run(prompt: list[int], n: int) -> list[int]:
        key = (tuple(prompt), n)
        if key not in cache:
            ids = torch.tensor([prompt])
            with torch.inference_mode():
                out = model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, min_new_tokens=0
                )
            cache[key] = out[0, len(prompt) :].tolist()
        return cache[key]

    return run


def random_prompts(lengths, vocab_size: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]


def drain(eng) -> None:
    """Steps the engine until nothing is left, then checks that every KV block
    came back and the core's bookkeeping holds."""
    for _ in range(10_000):
        if not eng.has_unfinished_requests():
            break
        eng.step()
    eng.step()
    snap = eng.snapshot()
    assert (snap.tkv, snap.n_reserved_blocks, snap.n_used_blocks) == (0, 0, 0), snap
    eng.scheduler.check_invariants()


def children(parent_pid: int) -> list[tuple[int, bytes]]:
    """``parent_pid``'s children: (pid, command line), read from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent_pid:
            out.append((int(entry), cmd))
    return out


def spawned_children(parent_pid: int) -> list[int]:
    """Pids of ``parent_pid``'s children started by multiprocessing's spawn
    (tensor-parallel workers; not its resource tracker)."""
    return [pid for pid, cmd in children(parent_pid) if b"spawn_main" in cmd]
