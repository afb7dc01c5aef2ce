"""Prometheus metrics (names prefixed ``spyre_cb_``), served as text at ``/metrics``.

What a step changed is measured where the engine runs, after every step:
a :class:`StepReporter` (one per engine) turns the engine's counters and the
step's outputs into a :class:`StepReport` (plain numbers: it crosses a
process boundary as is), and :meth:`Metrics.record` adds it to the registry.
A single engine does both on its engine thread; a data-parallel server's
replicas report from their processes and the server records each report
under its ``replica`` label."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from spyre_cb.data_parallel import DataParallelEngine
from spyre_cb.embedding import AsyncEmbedder
from spyre_cb.engine import Engine, StepOutput

if TYPE_CHECKING:
    from spyre_cb.async_engine import AsyncEngine


@dataclass
class StepReport:
    """One step's measurements: the core's counters after it and the latencies it observed."""

    running: int = 0
    waiting: int = 0
    blocks_used: int = 0
    blocks_reserved: int = 0
    tkv: int = 0
    tokens: int = 0
    itl: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    queue: list[float] = field(default_factory=list)
    #: per finished request: (finish reason, prompt tokens, generated tokens, seconds since arrival)
    finished: list[tuple[str, int, int, float]] = field(default_factory=list)
    #: prefix caching: blocks taken from the cache and requests that took any, this step
    prefix_hit_blocks: int = 0
    prefix_hit_requests: int = 0


class StepReporter:
    """Measures an engine's steps (it remembers each request's last token time, for ITL)."""

    def __init__(self) -> None:
        self._last_token: dict[str, float] = {}
        self._prefix = (0, 0)

    def report(self, engine: Engine, outs: list[StepOutput]) -> StepReport:
        r = StepReport(  # the core's counters: no snapshot every step
            engine.n_running, engine.n_waiting, engine.n_used_blocks, engine.n_reserved_blocks, engine.tkv
        )
        if engine.config.prefix_caching and engine.last_plan_kind not in (None, "idle", "decode"):
            c = engine.scheduler.counters  # (a prefill or chunk is where hits are taken)
            blocks, requests = c["prefix_cached_blocks"], c["prefix_hit_requests"]
            r.prefix_hit_blocks, r.prefix_hit_requests = blocks - self._prefix[0], requests - self._prefix[1]
            self._prefix = (blocks, requests)
        now = time.time()
        for o in outs:
            n = len(o.new_token_ids)
            if n:
                r.tokens += n
                last = self._last_token.get(o.request_id)
                if last is not None:
                    r.itl.append(now - last)
                self._last_token[o.request_id] = now
            state = engine.requests.get(o.request_id)
            if state is not None and n and len(state.output_token_ids) == 1:
                m = state.metrics
                if m.time_to_first_token is not None:
                    r.ttft.append(m.time_to_first_token)
                if m.queue_time is not None:
                    r.queue.append(m.queue_time)
            if o.finished:
                self._last_token.pop(o.request_id, None)
                if state is not None:
                    r.finished.append(
                        (
                            o.finish_reason or "abort",
                            len(state.prompt_token_ids),
                            len(state.output_token_ids),
                            now - state.metrics.arrival_time,
                        )
                    )
                else:
                    r.finished.append((o.finish_reason or "abort", -1, -1, -1.0))
        return r


class Metrics:
    """Prometheus metrics. With ``replicas`` (a data-parallel server) every
    engine metric carries a ``replica`` label, and ``spyre_cb_replica_up`` and
    ``spyre_cb_replica_restarts`` say how each replica fares."""

    def __init__(self, replicas: int | None = None) -> None:
        self.registry = r = CollectorRegistry()
        self.replicas = replicas
        L = ["replica"] if replicas is not None else []
        self.running = Gauge("spyre_cb_requests_running", "requests in the running batch", labelnames=L, registry=r)
        self.waiting = Gauge("spyre_cb_requests_waiting", "requests waiting for admission", labelnames=L, registry=r)
        self.blocks_used = Gauge("spyre_cb_kv_blocks_used", "KV blocks held by requests", labelnames=L, registry=r)
        self.blocks_reserved = Gauge(
            "spyre_cb_kv_blocks_reserved", "KV blocks reserved by admitted requests", labelnames=L, registry=r
        )
        self.tkv = Gauge("spyre_cb_batch_tkv", "tkv after the last step", labelnames=L, registry=r)
        self.tokens = Counter("spyre_cb_generation_tokens", "tokens generated", labelnames=L, registry=r)
        self.prompt_tokens = Counter(
            "spyre_cb_prompt_tokens", "prompt tokens of finished requests", labelnames=L, registry=r
        )
        self.finished = Counter(
            "spyre_cb_requests_finished", "requests finished, by reason", [*L, "finish_reason"], registry=r
        )
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram(
            "spyre_cb_time_to_first_token_seconds", "arrival to first token", buckets=buckets, labelnames=L, registry=r
        )
        self.itl = Histogram(
            "spyre_cb_inter_token_latency_seconds",
            "between consecutive tokens",
            buckets=buckets,
            labelnames=L,
            registry=r,
        )
        self.queue = Histogram(
            "spyre_cb_queue_time_seconds", "arrival to first scheduled", buckets=buckets, labelnames=L, registry=r
        )
        self.e2e = Histogram(
            "spyre_cb_e2e_request_latency_seconds",
            "arrival to the final output, per finished request",
            buckets=(*buckets, 120, 300),
            labelnames=L,
            registry=r,
        )
        sizes = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
        self.request_prompt_tokens = Histogram(
            "spyre_cb_request_prompt_tokens",
            "prompt tokens per finished request",
            buckets=sizes,
            labelnames=L,
            registry=r,
        )
        self.request_generation_tokens = Histogram(
            "spyre_cb_request_generation_tokens",
            "tokens generated per finished request",
            buckets=sizes,
            labelnames=L,
            registry=r,
        )
        self.prefix_hit_blocks = Counter(
            "spyre_cb_prefix_cache_hit_blocks",
            "KV blocks of prompts taken from the prefix cache (64 tokens each)",
            labelnames=L,
            registry=r,
        )
        self.prefix_hit_requests = Counter(
            "spyre_cb_prefix_cache_hit_requests",
            "requests that took blocks from the prefix cache",
            labelnames=L,
            registry=r,
        )
        self.engine_dead = Gauge(
            "spyre_cb_engine_dead", "1 once the engine met an error it cannot recover from, else 0", registry=r
        )
        self.embedding_inputs = Counter(
            "spyre_cb_embedding_inputs", "inputs embedded (an embedding model's server)", registry=r
        )
        if replicas is not None:  # a data-parallel server: how each replica fares
            self.replica_up = Gauge("spyre_cb_replica_up", "1 while the replica serves, else 0", L, registry=r)
            self.replica_restarts = Counter(
                "spyre_cb_replica_restarts", "times the replica was restarted after it died", L, registry=r
            )
            for i in range(replicas):  # every replica's series exist from the start
                self.replica_up.labels(replica=str(i)).set(0)
                self.replica_restarts.labels(replica=str(i))

    def watch(self, engine: AsyncEngine | AsyncEmbedder | DataParallelEngine) -> None:
        """Updates these metrics after every step of ``engine`` (every batch of an
        embedding model's; every replica's step, labelled, and its ups and downs,
        on a data-parallel server); the dead gauge reads ``engine.dead``."""
        if isinstance(engine, AsyncEmbedder):
            engine.on_batch.append(self.on_embedding_batch)
        elif isinstance(engine, DataParallelEngine):
            engine.on_report.append(lambda replica, report: self.record(report, replica))
            engine.on_replica.append(self.on_replica)
            for r in engine.status():
                self.on_replica(r.index, "up" if r.state == "up" else "down")
        else:
            reporter = StepReporter()
            engine.on_step.append(lambda e, outs: self.record(reporter.report(e, outs)))
        self.watch_dead(engine)

    def watch_dead(self, engine: Any) -> None:
        """The dead gauge reads ``engine.dead`` when scraped."""
        self.engine_dead.set_function(lambda: float(engine.dead is not None))

    def on_replica(self, replica: int, event: str) -> None:
        """A data-parallel replica came up, went down or is being restarted."""
        if event == "restarted":
            self.replica_restarts.labels(replica=str(replica)).inc()
            return
        self.replica_up.labels(replica=str(replica)).set(1 if event == "up" else 0)
        if event == "down":  # its queue, batch and blocks went with it
            self.record(StepReport(), replica)

    def on_embedding_batch(self, inputs: int, tokens: int) -> None:
        self.embedding_inputs.inc(inputs)
        self.prompt_tokens.inc(tokens)

    def record(self, r: StepReport, replica: int | None = None) -> None:
        """Adds one step's report (``replica``: whose, on a data-parallel server)."""
        lab = (lambda m: m.labels(replica=str(replica))) if self.replicas is not None else (lambda m: m)
        lab(self.running).set(r.running)
        lab(self.waiting).set(r.waiting)
        lab(self.blocks_used).set(r.blocks_used)
        lab(self.blocks_reserved).set(r.blocks_reserved)
        lab(self.tkv).set(r.tkv)
        if r.tokens:
            lab(self.tokens).inc(r.tokens)
        if r.prefix_hit_blocks:
            lab(self.prefix_hit_blocks).inc(r.prefix_hit_blocks)
        if r.prefix_hit_requests:
            lab(self.prefix_hit_requests).inc(r.prefix_hit_requests)
        for hist, values in ((self.itl, r.itl), (self.ttft, r.ttft), (self.queue, r.queue)):
            if values:
                h = lab(hist)
                for v in values:
                    h.observe(v)
        for reason, n_prompt, n_out, e2e in r.finished:
            (
                self.finished.labels(replica=str(replica), finish_reason=reason)
                if self.replicas is not None
                else self.finished.labels(reason)
            ).inc()
            if n_prompt >= 0:
                lab(self.prompt_tokens).inc(n_prompt)
                lab(self.request_prompt_tokens).observe(n_prompt)
                lab(self.request_generation_tokens).observe(n_out)
                lab(self.e2e).observe(e2e)

    def render(self) -> str:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry).decode()


__all__ = ["Metrics", "StepReport", "StepReporter"]
