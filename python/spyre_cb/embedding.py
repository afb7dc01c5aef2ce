"""Embedding (pooling) models: an encoder checkpoint turned into one vector per input.

An encoder request has no decode: its tokens run through the model once and
the last hidden states are pooled (the first token's, their mean or their
maximum) and, when the checkpoint says so, normalised to unit length. How to
pool comes from the checkpoint's sentence-transformers files
(``modules.json``, ``1_Pooling/config.json``, a ``Normalize`` module), as
sentence-transformers and vLLM read them; a checkpoint without them is pooled
from its first token (CLS) and normalised, as vLLM pools BERT-style models.

The model is FMS's RoBERTa/BERT encoder (``RoBERTaHeadless``), loaded through
FMS's own Hugging Face adapters. Batches are planned by the Rust core
(``spyre_cb._core.plan_pooling``) in Spyre's static shapes: every row of a
batch is right-padded to the same multiple of 64 tokens, a batch holds at
most ``max_num_seqs`` rows and ``max_batch_tkv_limit`` padded tokens.

:class:`Embedder` runs batches in the caller's thread; :class:`AsyncEmbedder`
gives it its own thread, where requests that arrive together are batched
together (the server's ``/v1/embeddings``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spyre_cb import _core, linear
from spyre_cb.checkpoint import ENCODER_ARCHITECTURES, Checkpoint
from spyre_cb.config import EngineConfig
from spyre_cb.cpus import ThreadSetting, intra_op_threads
from spyre_cb.errors import ConfigError, EngineDeadError, InvalidRequestError
from spyre_cb.prompts import PromptLike, as_batch, checked_token_ids
from spyre_cb.runner import TORCH_DTYPES, check_backend

log = logging.getLogger("spyre_cb.embedding")

#: sentence-transformers' pooling flags, by the mode each selects
_POOLING_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_max_tokens": "max"}


@dataclass(frozen=True)
class Pooling:
    """How hidden states become one vector: ``mode`` is ``cls``, ``mean`` or
    ``max``; ``normalize`` scales it to unit L2 norm."""

    mode: str = "cls"
    normalize: bool = True

    @classmethod
    def of(cls, path: Path) -> Pooling:
        """The pooling a checkpoint's sentence-transformers files describe (CLS and
        normalised when it has none); a ConfigError names what spyre_cb cannot run."""
        modules_file = path / "modules.json"
        if not modules_file.is_file():
            return cls()
        try:
            modules = json.loads(modules_file.read_text(encoding="utf-8"))
            kinds = [(str(m.get("type", "")).rsplit(".", 1)[-1], str(m.get("path", ""))) for m in modules]
        except (OSError, ValueError, AttributeError, TypeError) as e:
            raise ConfigError(f"{modules_file}: not a readable sentence-transformers module list ({e})") from None
        unknown = [k for k, _ in kinds if k not in ("Transformer", "Pooling", "Normalize")]
        if unknown:
            raise ConfigError(
                f"{modules_file}: module(s) {', '.join(unknown)} are not supported "
                "(spyre_cb runs Transformer, Pooling and Normalize)"
            )
        pool_dirs = [p for k, p in kinds if k == "Pooling"]
        normalize = any(k == "Normalize" for k, _ in kinds)
        if not pool_dirs:
            return cls("cls", normalize)
        pool_file = path / pool_dirs[0] / "config.json"
        try:
            pool = json.loads(pool_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{pool_file}: not a readable pooling config ({e})") from None
        modes = [mode for flag, mode in _POOLING_FLAGS.items() if pool.get(flag)]
        others = sorted(k for k, v in pool.items() if k.startswith("pooling_mode_") and v and k not in _POOLING_FLAGS)
        if len(modes) != 1 or others:
            raise ConfigError(
                f"{pool_file}: pooling {', '.join(modes + others) or 'none'} is not supported; "
                "spyre_cb pools with exactly one of cls_token, mean_tokens, max_tokens"
            )
        return cls(modes[0], normalize)

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``hidden`` [rows, length, dim], ``mask`` [rows, length] (True: a token) ->
        [rows, dim] in float32."""
        h = hidden.float()
        if self.mode == "cls":
            out = h[:, 0]
        elif self.mode == "mean":
            m = mask.unsqueeze(-1).to(h.dtype)
            out = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
        else:
            out = h.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)
        return torch.nn.functional.normalize(out, dim=-1) if self.normalize else out


@dataclass
class EmbeddingOutput:
    """One input's embedding (``LLM.embed``'s result, as vLLM's ``EmbeddingRequestOutput``)."""

    request_id: str
    prompt_token_ids: list[int]
    embedding: list[float]

    @property
    def outputs(self) -> EmbeddingOutput:
        """vLLM's shape: ``output.outputs.embedding``."""
        return self


def is_embedding_model(config: EngineConfig) -> bool:
    """Whether ``config``'s model is an embedding (encoder) model; a model that cannot
    be opened is not (the engine that opens it reports why)."""
    import warnings

    if config.model == "tiny-embed":
        return True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the engine warns about an unverified architecture
            return Checkpoint.open(config.with_model_path().model, allow_unverified=True).is_encoder
    except Exception:  # noqa: BLE001
        return False


def load_encoder(checkpoint: Checkpoint, dtype: torch.dtype) -> tuple[torch.nn.Module, int]:
    """FMS's encoder for ``checkpoint`` with its weights (through FMS's Hugging Face
    adapters), and its hidden size."""
    from fms.distributed.strategy import NoOpStrategy
    from fms.models.hf.config_utils import param_builders
    from fms.models.roberta import RoBERTaConfig, RoBERTaHeadless
    from fms.utils import serialization
    from transformers import AutoConfig

    kind = ENCODER_ARCHITECTURES[checkpoint.architecture]
    path = str(checkpoint.path)
    try:
        hf = AutoConfig.from_pretrained(path)
        build = param_builders.build_roberta_params if kind == "roberta" else param_builders.build_bert_params
        params = build(hf)
        fields = RoBERTaConfig.__dataclass_fields__
        config = RoBERTaConfig(**{k: v for k, v in params.items() if k in fields})
        config.p_dropout = 0.0
        model = RoBERTaHeadless(config, NoOpStrategy)
        sd = serialization.load_state_dict(path)
        # a headless checkpoint (RobertaModel, BertModel) names its weights without the
        # task models' prefix FMS's adapter expects
        prefix = f"{kind}."
        sd = {k if k.startswith(prefix) else prefix + k: v for k, v in sd.items()}
        adapted = serialization.get_adapted(kind, "hf", sd, {"model_config": config})
        weights = {k.removeprefix("base_model."): v for k, v in adapted.items() if k.startswith("base_model.")}
        model.load_state_dict(weights, strict=True)
    except Exception as e:  # an unreadable or incomplete checkpoint
        raise ConfigError(f"could not load encoder from {path!r} with FMS: {type(e).__name__}: {e}") from e
    return model.to(dtype).eval(), int(config.emb_dim)


class Embedder:
    """An encoder checkpoint serving embeddings, in this thread.

    ``Embedder(model, config=None, **options)`` takes the options of
    :class:`~spyre_cb.config.EngineConfig` (``max_num_seqs``, ``max_model_len``,
    ``max_batch_tkv_limit``, ``dtype``, ``linear_ops``, ``num_threads``;
    ``model="tiny-embed"`` is the offline tiny encoder).
    """

    def __init__(
        self, model: str | os.PathLike[str] | None = None, config: EngineConfig | None = None, **options: Any
    ) -> None:
        if model is not None:
            options["model"] = os.fspath(model)
        cfg = EngineConfig.from_kwargs(config, **options)
        check_backend(cfg.backend)
        cfg = cfg.with_model_path()
        if cfg.tensor_parallel_size != 1:
            raise ConfigError("an embedding model runs on one rank: tensor_parallel_size must be 1")
        if cfg.backend != "eager":
            raise ConfigError(f"an embedding model runs with backend 'eager' here, not {cfg.backend!r}")
        ckpt = Checkpoint.open(cfg.model, allow_unverified=cfg.allow_unverified_architectures)
        if not ckpt.is_encoder:
            raise ConfigError(
                f"{ckpt.architecture} is a generative model, not an embedding model "
                f"(embedding models: {', '.join(ENCODER_ARCHITECTURES)}); run it with Engine or LLM.generate"
            )
        positions = ckpt.encoder_positions()
        if positions is not None and cfg.max_model_len > positions:
            raise ConfigError(
                f"max_model_len {cfg.max_model_len} exceeds the {positions} positions of the model "
                f"({ckpt.path / 'config.json'})"
            )
        _core.plan_pooling([], cfg.scheduler)  # limits that fit no batch: a ConfigError now, not per request
        self.config = cfg
        self.model_path = ckpt.path
        self.architecture = ckpt.architecture
        self.tokenizer = ckpt.load_tokenizer()
        self.pooling = Pooling.of(ckpt.path)
        self._threads = ThreadSetting(intra_op_threads(cfg.num_threads))
        dtype = TORCH_DTYPES[cfg.dtype]
        self.model, self.hidden_size = load_encoder(ckpt, dtype)
        self.linear_ops = linear.resolve(cfg.linear_ops, cfg.backend, dtype)
        linear.replace_linears(self.model, self.linear_ops, batch_hint=cfg.max_num_seqs * 64)
        self.vocab_size = int(ckpt.config.get("vocab_size") or 0)
        pad = ckpt.config.get("pad_token_id")
        self.pad_id = int(pad) if isinstance(pad, int) else 0
        #: the output sizes ``dimensions`` may ask for (a Matryoshka model's), or None
        self.matryoshka = _matryoshka(ckpt.config, self.hidden_size)
        #: batches run (each one forward of one static shape)
        self.batches_run = 0
        self._lock = threading.Lock()

    def shutdown(self) -> None:
        self._threads.restore()

    def __enter__(self) -> Embedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ----- inputs --------------------------------------------------------------

    def token_ids(self, prompt: str | Sequence[int], index: int = 0) -> list[int]:
        """A prompt's token ids: a string is tokenized with the model's special tokens
        (as sentence-transformers does); ids are checked against the vocabulary."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError(f"input {index} is empty: an embedding needs at least one token")
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: give token ids")
            if len(prompt) > 32 * self.config.max_model_len:
                raise InvalidRequestError(
                    f"input {index} has {len(prompt)} characters, more than max_model_len "
                    f"{self.config.max_model_len} tokens can hold"
                )
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        return checked_token_ids(prompt, self.vocab_size, f"input[{index}]")

    def check_dimensions(self, dimensions: int | None) -> None:
        """Refuses ``dimensions`` the model cannot give (InvalidRequestError naming why)."""
        if dimensions is None:
            return
        if self.matryoshka is None:
            raise InvalidRequestError(
                f"dimensions is not supported by this model: it is not a Matryoshka model "
                f"(its embeddings have {self.hidden_size} dimensions)"
            )
        if isinstance(dimensions, bool) or dimensions not in self.matryoshka:
            sizes = self.matryoshka
            said = (
                f"any size from 1 to {sizes[-1]}"
                if sizes == tuple(range(1, sizes[-1] + 1))
                else ", ".join(map(str, sizes))
            )
            raise InvalidRequestError(f"dimensions {dimensions!r} is not one this model was trained for: {said}")

    # ----- running -------------------------------------------------------------

    @torch.inference_mode()
    def embed_token_ids(self, inputs: Sequence[Sequence[int]], dimensions: int | None = None) -> torch.Tensor:
        """The embeddings of token-id lists (checked by :meth:`token_ids`), float32
        [len(inputs), dimensions or hidden size], in input order."""
        self.check_dimensions(dimensions)
        lengths = [len(x) for x in inputs]
        plan = _core.plan_pooling(lengths, self.config.scheduler)
        out = torch.empty(len(inputs), self.hidden_size, dtype=torch.float32)
        with self._lock:
            for rows, padded in plan:
                ids = torch.full((len(rows), padded), self.pad_id, dtype=torch.long)
                mask = torch.zeros(len(rows), padded, dtype=torch.bool)
                for r, i in enumerate(rows):
                    ids[r, : lengths[i]] = torch.tensor(inputs[i], dtype=torch.long)
                    mask[r, : lengths[i]] = True
                # a key is seen by every query of its row when it is a token (not padding)
                hidden = self.model(ids, mask=mask.unsqueeze(1).expand(-1, padded, -1))
                out[torch.tensor(rows)] = self.pooling(hidden, mask)
                self.batches_run += 1
        if dimensions is not None and dimensions < self.hidden_size:
            out = out[:, :dimensions]
            if self.pooling.normalize:
                out = torch.nn.functional.normalize(out, dim=-1)
        return out

    def embed(
        self, prompts: PromptLike | Sequence[PromptLike], *, dimensions: int | None = None
    ) -> list[EmbeddingOutput]:
        """One :class:`EmbeddingOutput` per prompt (in any of :mod:`spyre_cb.prompts`' forms), in order."""
        batch = as_batch(prompts)
        ids = [self.token_ids(p, i) for i, p in enumerate(batch)]
        vectors = self.embed_token_ids(ids, dimensions)
        return [EmbeddingOutput(str(i), x, v.tolist()) for i, (x, v) in enumerate(zip(ids, vectors, strict=True))]


def _matryoshka(config: dict[str, Any], hidden: int) -> tuple[int, ...] | None:
    dims = config.get("matryoshka_dimensions")
    if isinstance(dims, list) and dims and all(isinstance(d, int) and 0 < d <= hidden for d in dims):
        return tuple(sorted(set(dims)))
    if config.get("is_matryoshka") is True:
        return tuple(range(1, hidden + 1))
    return None


# ----- the server's side: a thread that batches what arrives together ------------------

_Job = tuple[list[list[int]], int | None, asyncio.AbstractEventLoop, "asyncio.Future[torch.Tensor]"]


class AsyncEmbedder:
    """An :class:`Embedder` driven by its own thread: coroutines :meth:`embed`;
    the inputs of every request waiting when the thread wakes are planned and run
    together (a request's inputs are never split from its answer). A request whose
    caller went away before its batch runs is skipped. ``on_batch`` hooks get
    ``(inputs, tokens)`` after each round."""

    def __init__(self, embedder: Embedder) -> None:
        self.engine = embedder
        self.dead: str | None = None
        self.on_batch: list[Callable[[int, int], None]] = []
        self._jobs: list[_Job] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="spyre-cb-embedder", daemon=True)
        self._thread.start()

    async def embed(self, inputs: list[list[int]], dimensions: int | None = None) -> torch.Tensor:
        self.engine.check_dimensions(dimensions)
        _core.plan_pooling([len(x) for x in inputs], self.engine.config.scheduler)  # bad lengths: refused now
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[torch.Tensor] = loop.create_future()
        with self._cv:
            if self.dead is not None or self._stopping:
                raise EngineDeadError(f"the embedder is dead: {self.dead or 'shut down'}")
            self._jobs.append((inputs, dimensions, loop, fut))
            self._cv.notify()
        return await fut

    def _loop(self) -> None:
        jobs: list[_Job] = []
        try:
            while True:
                with self._cv:
                    while not self._jobs and not self._stopping:
                        self._cv.wait()
                    if self._stopping:
                        break
                    jobs, self._jobs = self._jobs, []
                self._round([j for j in jobs if not j[3].cancelled()])
                jobs = []
        except BaseException as e:  # noqa: BLE001 (the thread must not die silently)
            log.exception("the embedder thread failed")
            with self._cv:
                self.dead = f"{type(e).__name__}: {e}"
        # nobody is left waiting: what was queued (or in the failed round) fails
        with self._cv:
            self._stopping = True  # (embed() refuses from now on)
            left, self._jobs = jobs + self._jobs, []
        why = EngineDeadError(f"the embedder stopped: {self.dead or 'shut down'}")
        for _, _, loop, fut in left:
            _settle_threadsafe(loop, fut, None, why)

    def _round(self, jobs: list[_Job]) -> None:
        # one plan per requested size (most requests give none: one plan for all)
        for dims in {j[1] for j in jobs}:
            group = [j for j in jobs if j[1] == dims]
            flat = [x for j in group for x in j[0]]
            try:
                vectors = self.engine.embed_token_ids(flat, dims)
            except Exception as e:  # noqa: BLE001 (the requests fail; the embedder serves on)
                log.exception("an embedding batch failed")
                for _, _, loop, fut in group:
                    _settle_threadsafe(loop, fut, None, e)
                continue
            at = 0
            for inputs, _, loop, fut in group:
                _settle_threadsafe(loop, fut, vectors[at : at + len(inputs)], None)
                at += len(inputs)
            for hook in self.on_batch:
                try:
                    hook(len(flat), sum(len(x) for x in flat))
                except Exception:  # noqa: BLE001 (a metrics hook never stops the embedder)
                    log.exception("an on_batch hook failed")

    def shutdown(self, timeout_s: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout_s)
        self.engine.shutdown()


def _settle_threadsafe(
    loop: asyncio.AbstractEventLoop,
    fut: asyncio.Future[torch.Tensor],
    value: torch.Tensor | None,
    error: BaseException | None,
) -> None:
    """Settles ``fut`` on its loop (nothing when that loop has closed: its caller is gone)."""
    try:
        loop.call_soon_threadsafe(_settle, fut, value, error)
    except RuntimeError:
        pass


def _settle(fut: asyncio.Future[torch.Tensor], value: torch.Tensor | None, error: BaseException | None) -> None:
    if fut.done():  # cancelled by its caller (or already failed)
        return
    if error is not None:
        fut.set_exception(error)
    else:
        assert value is not None
        fut.set_result(value)


__all__ = ["AsyncEmbedder", "Embedder", "EmbeddingOutput", "Pooling", "is_embedding_model", "load_encoder"]
