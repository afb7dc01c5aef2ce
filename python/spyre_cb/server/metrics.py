"""Prometheus metrics (names prefixed ``spyre_cb_``), updated by a step hook
on the engine thread after every step and served as text at ``/metrics``."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from spyre_cb.embedding import AsyncEmbedder
from spyre_cb.engine import Engine, StepOutput

if TYPE_CHECKING:
    from spyre_cb.async_engine import AsyncEngine


class Metrics:
    """Prometheus metrics, updated on the engine thread after every step."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.running = Gauge("spyre_cb_requests_running", "requests in the running batch", registry=r)
        self.waiting = Gauge("spyre_cb_requests_waiting", "requests waiting for admission", registry=r)
        self.blocks_used = Gauge("spyre_cb_kv_blocks_used", "KV blocks held by requests", registry=r)
        self.blocks_reserved = Gauge(
            "spyre_cb_kv_blocks_reserved", "KV blocks reserved by admitted requests", registry=r
        )
        self.tkv = Gauge("spyre_cb_batch_tkv", "tkv after the last step", registry=r)
        self.tokens = Counter("spyre_cb_generation_tokens", "tokens generated", registry=r)
        self.prompt_tokens = Counter("spyre_cb_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.finished = Counter(
            "spyre_cb_requests_finished", "requests finished, by reason", ["finish_reason"], registry=r
        )
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram(
            "spyre_cb_time_to_first_token_seconds", "arrival to first token", buckets=buckets, registry=r
        )
        self.itl = Histogram(
            "spyre_cb_inter_token_latency_seconds", "between consecutive tokens", buckets=buckets, registry=r
        )
        self.queue = Histogram("spyre_cb_queue_time_seconds", "arrival to first scheduled", buckets=buckets, registry=r)
        self.e2e = Histogram(
            "spyre_cb_e2e_request_latency_seconds",
            "arrival to the final output, per finished request",
            buckets=(*buckets, 120, 300),
            registry=r,
        )
        sizes = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
        self.request_prompt_tokens = Histogram(
            "spyre_cb_request_prompt_tokens", "prompt tokens per finished request", buckets=sizes, registry=r
        )
        self.request_generation_tokens = Histogram(
            "spyre_cb_request_generation_tokens", "tokens generated per finished request", buckets=sizes, registry=r
        )
        self.engine_dead = Gauge(
            "spyre_cb_engine_dead", "1 once the engine met an error it cannot recover from, else 0", registry=r
        )
        self.embedding_inputs = Counter(
            "spyre_cb_embedding_inputs", "inputs embedded (an embedding model's server)", registry=r
        )
        self._last_token: dict[str, float] = {}

    def watch(self, engine: AsyncEngine | AsyncEmbedder) -> None:
        """Updates these metrics after every step of ``engine`` (every batch of an
        embedding model's); the dead gauge reads ``engine.dead``."""
        if isinstance(engine, AsyncEmbedder):
            engine.on_batch.append(self.on_embedding_batch)
        else:
            engine.on_step.append(self.on_step)
        self.engine_dead.set_function(lambda: float(engine.dead is not None))

    def on_embedding_batch(self, inputs: int, tokens: int) -> None:
        self.embedding_inputs.inc(inputs)
        self.prompt_tokens.inc(tokens)

    def on_step(self, engine: Engine, outs: list[StepOutput]) -> None:
        self.running.set(engine.n_running)  # the core's counters: no snapshot every step
        self.waiting.set(engine.n_waiting)
        self.blocks_used.set(engine.n_used_blocks)
        self.blocks_reserved.set(engine.n_reserved_blocks)
        self.tkv.set(engine.tkv)
        now = time.time()
        for o in outs:
            n = len(o.new_token_ids)
            if n:
                self.tokens.inc(n)
                last = self._last_token.get(o.request_id)
                if last is not None:
                    self.itl.observe(now - last)
                self._last_token[o.request_id] = now
            state = engine.requests.get(o.request_id)
            if state is not None and n and len(state.output_token_ids) == 1:
                m = state.metrics
                if m.time_to_first_token is not None:
                    self.ttft.observe(m.time_to_first_token)
                if m.queue_time is not None:
                    self.queue.observe(m.queue_time)
            if o.finished:
                self._last_token.pop(o.request_id, None)
                self.finished.labels(o.finish_reason or "abort").inc()
                if state is not None:
                    self.prompt_tokens.inc(len(state.prompt_token_ids))
                    self.request_prompt_tokens.observe(len(state.prompt_token_ids))
                    self.request_generation_tokens.observe(len(state.output_token_ids))
                    self.e2e.observe(now - state.metrics.arrival_time)

    def render(self) -> str:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry).decode()


__all__ = ["Metrics"]
