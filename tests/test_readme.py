"""The README, run as a new user runs it.

Every ```python block is executed on its own (fresh namespace, temporary
working directory, the offline tiny model built into a temporary
``$SPYRE_CB_CACHE``), one statement at a time: where a statement is an
expression whose comment is a Python literal (``cfg.available_blocks  # 6``,
or a dict spread over the following comment lines), the expression must
equal it. Every command of the ```bash blocks is either run (cheap and
offline) or skipped for a reason listed in ``SKIPPED_COMMANDS``; an
unlisted command fails, so a new README command has to be classified here.
The ```text blocks are checked too: a ``$ command`` block is run and its
output must have the shape shown (numbers masked), and the command-line
synopsis may only name flags the commands have.

Test ids are ``<language>-L<line>``, the README line of the block's first
line of code, so a failure names its block.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


@dataclasses.dataclass(frozen=True)
class Block:
    lang: str
    line: int  #: README line (1-based) of the block's first line of code
    code: str

    @property
    def id(self) -> str:
        return f"{self.lang or 'plain'}-L{self.line}"


def readme_blocks() -> list[Block]:
    blocks: list[Block] = []
    lang: str | None = None
    start, body = 0, []
    for n, text in enumerate(README.read_text(encoding="utf-8").splitlines(), start=1):
        fence = re.fullmatch(r"```\s*([\w+-]*)\s*", text)
        if lang is None and fence:
            lang, start, body = fence.group(1), n + 1, []
        elif lang is not None and text.strip() == "```":
            blocks.append(Block(lang, start, "\n".join(body) + "\n"))
            lang = None
        elif lang is not None:
            body.append(text)
    assert lang is None, f"README.md: the block opened at line {start - 1} is never closed"
    return blocks


BLOCKS = readme_blocks()


def blocks(lang: str) -> list[Block]:
    return [b for b in BLOCKS if b.lang == lang]


def params(items: list[Block]) -> list:
    return [pytest.param(b, id=b.id) for b in items]


# ----- environment ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One $SPYRE_CB_CACHE for the module: the tiny model is built once (~5 s), offline."""
    return tmp_path_factory.mktemp("spyre_cb_cache")


@pytest.fixture
def user_env(cache_dir, tmp_path, monkeypatch) -> Path:
    """A user's shell: a fresh working directory, the module's model cache."""
    monkeypatch.setenv("SPYRE_CB_CACHE", str(cache_dir))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def spyre_cb_command() -> list[str]:
    """The installed ``spyre-cb`` script next to this interpreter, else ``python -m spyre_cb``."""
    script = Path(sys.executable).parent / "spyre-cb"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "spyre_cb"]


def run_spyre_cb(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        spyre_cb_command() + args, capture_output=True, text=True, timeout=timeout, env=dict(os.environ)
    )


# ----- python blocks -------------------------------------------------------------------

#: Python blocks that talk to ``spyre-cb serve tiny --port 8000`` (the README's command), by a
#: line they contain: run against that command, started here on a free port.
SERVED_PYTHON = "from openai import OpenAI"
README_PORT = "127.0.0.1:8000"


def readme_serve_command() -> list[str]:
    """The README's ``spyre-cb serve tiny --port 8000 ...`` command (comment dropped)."""
    for b in blocks("bash"):
        for command in bash_commands(b):
            if command.startswith("spyre-cb serve tiny --port 8000"):
                return shlex.split(command)[1:]
    raise AssertionError("the README no longer shows `spyre-cb serve tiny --port 8000`")


@contextlib.contextmanager
def readme_server(log: Path) -> Iterator[str]:
    """The README's ``spyre-cb serve tiny --port 8000`` command, on a free port; yields host:port."""
    from test_server import _free_port, _get

    port = _free_port()
    args = [str(port) if a == "8000" else a for a in readme_serve_command()]
    with open(log, "w") as out:
        proc = subprocess.Popen(spyre_cb_command() + args, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"the server exited: {log.read_text()}"
            assert time.monotonic() < deadline, "the server did not come up in 120 s"
            try:
                if _get(f"http://127.0.0.1:{port}/health", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def shown_results(code: str) -> dict[int, object]:
    """{line of an expression statement: the literal its comment shows}.

    The comment is the expression's trailing comment (if any) plus the
    comment-only lines right below it; it counts only if it parses as a
    Python literal.
    """
    lines = code.splitlines()
    out: dict[int, object] = {}
    for stmt in ast.parse(code).body:
        if not isinstance(stmt, ast.Expr) or stmt.end_lineno is None:
            continue
        last = stmt.end_lineno  # 1-based
        head = lines[last - 1][stmt.end_col_offset :].strip()
        parts = [head[1:]] if head.startswith("#") else []
        for below in lines[last:]:
            if not below.lstrip().startswith("#"):
                break
            parts.append(below.lstrip()[1:])
        if not parts:
            continue
        try:
            out[stmt.lineno] = ast.literal_eval(" ".join(p.strip() for p in parts))
        except (ValueError, SyntaxError):
            continue  # prose, not a shown result
    return out


def run_python_block(block: Block) -> dict[str, object]:
    """Executes the block statement by statement in a fresh namespace; checks every shown result."""
    tree = ast.parse(block.code, filename=str(README))
    ast.increment_lineno(tree, block.line - 1)  # tracebacks name README lines
    expected = {line + block.line - 1: v for line, v in shown_results(block.code).items()}
    namespace: dict[str, object] = {"__name__": "__main__"}
    checked = 0
    for stmt in tree.body:
        if isinstance(stmt, ast.Expr) and stmt.lineno in expected:
            value = eval(compile(ast.Expression(stmt.value), str(README), "eval"), namespace)
            if hasattr(value, "to_dict") and isinstance(expected[stmt.lineno], dict):
                value = value.to_dict()
            assert value == expected[stmt.lineno], f"README.md line {stmt.lineno} shows {expected[stmt.lineno]!r}"
            checked += 1
        else:
            exec(compile(ast.Module([stmt], type_ignores=[]), str(README), "exec"), namespace)
    assert checked == len(expected)
    return namespace


def test_the_readme_has_the_blocks_this_file_expects():
    assert len(blocks("python")) >= 8 and len(blocks("bash")) >= 3
    # the shown results the python blocks are checked against (trace[2].to_dict(), (6, 384), ...)
    assert sum(len(shown_results(b.code)) for b in blocks("python")) >= 6
    assert any(SERVED_PYTHON in b.code and README_PORT in b.code for b in blocks("python"))


@pytest.mark.parametrize("block", params(blocks("python")))
def test_python_block(block: Block, user_env: Path):
    if SERVED_PYTHON in block.code:
        pytest.importorskip("openai")
        pytest.importorskip("fastapi")
        with readme_server(user_env / "server.log") as address:
            block = dataclasses.replace(block, code=block.code.replace(README_PORT, address))
            with contextlib.redirect_stdout(io.StringIO()):
                run_python_block(block)
        return
    with contextlib.redirect_stdout(io.StringIO()):
        run_python_block(block)


# ----- bash blocks ---------------------------------------------------------------------

#: Commands of the bash blocks that are not run here (by how they start), with the reason.
SKIPPED_COMMANDS = {
    "pip install": "installs packages; this test runs against the package already installed",
    "bash .ci/run": "the whole CI run (lint, cargo test, every pytest: minutes)",
    "spyre-cb serve": "a server that runs until stopped; test_python_block starts the first one (on a free "
    "port) for the openai block, tests/test_server*.py start the others",
    "curl ": "needs the server of the block above",
}
#: Commands that are run, with what their output must show.
RUN_COMMANDS = {
    # "per step the kind (prefill/decode), tkv, waiting and running ids and reserved/used KV
    # blocks, then the generated texts", with the API's default limits
    "spyre-cb demo": ["step kind", "tkv", "waiting", "running", "blocks r/u", " prefill ", " decode ", "generated:"]
    + ["max_num_seqs=4 max_model_len=512 blocks=32"],
}


def bash_commands(block: Block) -> list[str]:
    """The block's commands: continuation lines joined, comments dropped, split at &&."""
    commands = []
    for line in block.code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words:
            n = words.index("&&") if "&&" in words else len(words)
            commands.append(shlex.join(words[:n]))
            words = words[n + 1 :]
    return commands


BASH = [
    pytest.param(b, cmd, id=f"{b.id}-{'-'.join(cmd.split()[:2])}") for b in blocks("bash") for cmd in bash_commands(b)
]


@pytest.mark.parametrize(("block", "command"), BASH)
def test_bash_command(block: Block, command: str, user_env: Path):
    for prefix, reason in SKIPPED_COMMANDS.items():
        if command.startswith(prefix):
            pytest.skip(reason)
    expected = next((v for k, v in RUN_COMMANDS.items() if command.startswith(k)), None)
    assert expected is not None, f"README.md line {block.line}: {command!r} is neither run nor skipped by this test"
    r = run_spyre_cb(shlex.split(command)[1:])
    assert r.returncode == 0, r.stderr
    for needle in expected:
        assert needle in r.stdout, (needle, r.stdout)


# ----- text blocks ---------------------------------------------------------------------


def shape(text: str) -> list[str]:
    """Output lines with every number masked and runs of spaces collapsed."""
    return [re.sub(r"\s+", " ", re.sub(r"\d+(\.\d+)?", "N", ln)).strip() for ln in text.splitlines()]


SESSIONS = [b for b in blocks("text") if b.code.startswith("$ ")]


@pytest.mark.parametrize("block", params(SESSIONS))
def test_shown_session_output_has_the_shape_the_command_prints(block: Block, user_env: Path):
    command, *shown = block.code.splitlines()
    args = shlex.split(command[2:])
    assert args[0] == "spyre-cb"
    r = run_spyre_cb(args[1:])
    assert r.returncode == 0, r.stderr
    assert shape(r.stdout) == shape("\n".join(shown))
    for i, a in enumerate(args):  # files the command says it wrote exist
        if a in ("--plot", "--json"):
            assert (user_env / args[i + 1]).stat().st_size > 0
    # the README's claim under the continuous policy: queueing delay = time to first token
    figures = {ln[:17].strip(): re.findall(r"(mean|p50) ([\d.]+)", ln) for ln in r.stdout.splitlines()}
    if "time to 1st token" in figures and "--policy" not in args:
        assert figures["queueing delay"][:2] == figures["time to 1st token"][:2]


def synopsis() -> Block:
    return next(b for b in blocks("text") if b.code.startswith("spyre-cb --version"))


def help_text(command: str) -> str:
    from spyre_cb.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    return out.getvalue()


def flags(text: str) -> set[str]:
    """Every --flag the text names (``--[no-]x`` names both)."""
    out = set()
    for m in re.finditer(r"--(\[no-\])?([a-z][a-z-]*)", text):
        out.add("--" + m.group(2))
        if m.group(1):
            out.add("--no-" + m.group(2))
    return out


def test_the_command_line_synopsis_names_only_flags_that_exist():
    """Each command's line and the option lists under it: every flag shown is in that command's --help."""
    lines = synopsis().code.splitlines()
    sections: dict[str, str] = {}
    current = None
    for line in lines:
        m = re.match(r"spyre-cb (\w+)", line)
        if m:
            current = m.group(1)
        elif re.match(r"(SAMPLING|ENGINE) OPTIONS", line):
            current = line.split()[0]
        elif line.startswith("spyre-cb"):
            current = None  # spyre-cb --version
        if current:
            sections[current] = sections.get(current, "") + line + "\n"
    assert {"demo", "generate", "serve", "simulate", "SAMPLING", "ENGINE"} <= set(sections)
    helps = {c: help_text(c) for c in ("demo", "generate", "serve", "simulate")}
    for command, text in sections.items():
        targets = {"SAMPLING": ["generate"], "ENGINE": ["demo", "generate", "serve"]}.get(command, [command])
        for target in targets:
            missing = flags(text) - flags(helps[target]) - {"--version"}
            assert not missing, f"README synopsis: spyre-cb {target} has no {sorted(missing)}"


def test_the_configuration_table_is_engine_config():
    """Every EngineConfig option has a row, every row is an option, and a default shown as
    a literal is the declared one."""
    from spyre_cb.config import EngineConfig

    text = README.read_text(encoding="utf-8")
    table = text[text.index("| option | default | meaning |") :].split("\n\n")[0]
    rows = re.findall(r"^\| `(\w+)` \| ([^|]+) \|", table, flags=re.M)
    declared = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    assert [name for name, _ in rows] == list(declared)
    literal = 0
    for name, cell in rows:
        try:
            shown = ast.literal_eval(cell.strip().strip("`"))
        except (ValueError, SyntaxError):
            assert declared[name] is None, (name, cell)  # a rule in words stands for None
            continue
        assert shown == declared[name], name
        literal += 1
    assert literal >= 15


def test_the_sampling_params_signature_is_the_real_one():
    import spyre_cb

    text = README.read_text(encoding="utf-8")
    shown = re.search(r"`(SamplingParams\(n=.*?\))`", text, flags=re.S)
    assert shown
    call = ast.parse(shown.group(1).replace("\n", " "), mode="eval").body
    assert isinstance(call, ast.Call)
    fields = {f.name: f.default for f in dataclasses.fields(spyre_cb.SamplingParams) if not f.name.startswith("_")}
    assert {k.arg: ast.literal_eval(k.value) for k in call.keywords} == fields


def test_the_layout_names_paths_that_exist():
    layout = next(b for b in blocks("") if b.code.startswith("Cargo.toml"))
    for line in layout.code.splitlines():
        first = line.split()[0] if line.strip() and not line.startswith(" ") else None
        if first:
            assert (ROOT / first).exists(), first


# ----- what a new user found (regressions) ---------------------------------------------


def test_engine_takes_the_model_forms_llm_takes(user_env: Path):
    """Engine("tiny"), Engine() and Engine(config=EngineConfig()) load the offline tiny
    model, as LLM does: EngineConfig.model defaults to "tiny"."""
    from spyre_cb import LLM, Engine, EngineConfig
    from spyre_cb.errors import ConfigError

    engines = [Engine("tiny"), Engine(), Engine(config=EngineConfig(max_num_seqs=2)), Engine(model=Path("tiny"))]
    llm = LLM("tiny")
    assert all(e.model_path == llm.engine.model_path for e in engines)
    assert engines[0].config.model == llm.engine.config.model == str(llm.engine.model_path)
    assert engines[2].config.max_num_seqs == 2 and engines[0].config.max_model_len == EngineConfig().max_model_len
    with pytest.raises(ConfigError, match="model must be a checkpoint directory path or 'tiny', got int"):
        Engine(42)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="missing|not a directory|no such|does not exist"):
        Engine(str(user_env / "no-such-checkpoint"))


@pytest.mark.parametrize("command", ["demo", "generate", "serve"])
def test_engine_commands_default_to_the_engine_config(command: str):
    """The CLI's engine flags take EngineConfig's declared defaults (demo used max_model_len 256)."""
    from spyre_cb.cli import build_parser
    from spyre_cb.config import EngineConfig

    argv = [command] + (["--prompt", "x"] if command == "generate" else [])
    a = build_parser().parse_args(argv)
    for f in dataclasses.fields(EngineConfig):
        assert getattr(a, f.name) == f.default, f.name


def test_queue_delay_and_time_to_first_token_share_one_percentile(user_env: Path):
    """Under the continuous policy a request's first token comes at its admission, so its
    queueing delay and time to first token are the same number of steps: the summary, the
    core's latency figures and the CLI must report the same p50 (nearest rank: 1 of {1, 2},
    not the interpolated 1.5 the CLI printed as 2)."""
    import spyre_cb

    s = spyre_cb.simulate_stats([(0, 49, 10), (0, 70, 4)], max_num_seqs=2, max_model_len=192).summary()
    assert s["queue_delay_p50"] == s["ttft_steps"]["p50"] == 1.0
    assert s["queue_delay_p95"] == 2.0 and s["queue_delay_mean"] == s["ttft_steps"]["mean"] == 1.5
    (user_env / "w.json").write_text("[[0, 49, 10], [0, 70, 4]]")
    r = run_spyre_cb(["simulate", "w.json", "--max-num-seqs", "2", "--max-model-len", "192", "--summary"])
    assert r.returncode == 0, r.stderr
    lines = {ln[:17].strip(): ln for ln in r.stdout.splitlines()}
    assert "p50 1," in lines["queueing delay"] and "p50 1," in lines["time to 1st token"]

    import numpy as np

    from spyre_cb.stats import nearest_rank

    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 7, 100, 1001):
        v = rng.integers(0, 50, n)
        for p in (1, 50, 95, 99, 100):
            # the smallest observed value with at least p% of the sample at or below it
            want = min(x for x in v if (v <= x).sum() >= p / 100 * n)
            assert nearest_rank(v, p) == want
    assert nearest_rank(np.array([], dtype=np.int64), 50) == 0.0
