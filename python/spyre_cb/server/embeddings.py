"""``/v1/embeddings`` over an :class:`~spyre_cb.embedding.AsyncEmbedder` (OpenAI's shape).

``input`` is a string, a list of strings, token ids, or a list of token-id
lists (at most :data:`MAX_INPUTS`); ``encoding_format`` is ``float`` or
``base64`` (little-endian float32, what the ``openai`` client asks for by
default); ``dimensions`` is taken only from a Matryoshka model. An empty
input, one longer than ``max_model_len`` tokens, or an id outside the
vocabulary is a 400 naming the limit, and nothing of the request runs.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from spyre_cb.embedding import AsyncEmbedder
from spyre_cb.errors import EngineDeadError, SpyreCBError
from spyre_cb.server import access
from spyre_cb.server.errors import APIError, engine_dead
from spyre_cb.server.options import ServerOptions
from spyre_cb.server.protocol import warn_unknown

#: Most inputs one request may hold (OpenAI's limit).
MAX_INPUTS = 2048


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _token_ids_are_ints(cls, v: Any) -> Any:
        items = v if isinstance(v, list) else []
        for x in [y for item in items for y in (item if isinstance(item, list) else [item])]:
            if isinstance(x, (bool, float)):
                raise ValueError(f"token ids must be JSON integers, got {x!r}")
        return v

    def inputs(self) -> list[str | list[int]]:
        x = self.input
        if isinstance(x, str):
            return [x]
        if not x:
            raise APIError(400, "input must not be an empty list", "invalid_request_error", "input")
        if all(isinstance(t, int) for t in x):
            return [list(x)]  # type: ignore[arg-type]
        return list(x)  # type: ignore[arg-type]


class ServedModel:
    """What every served model answers: its card (``/v1/models``) and the 404 of
    another model's name; the tokenizer routes read ``tokenizer``,
    ``max_model_len`` and ``vocab_size``."""

    def __init__(self, options: ServerOptions, default_name: str, tokenizer: Any, max_model_len: int, vocab: int):
        self.options = options
        self.model_name = options.served_model_name or default_name
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab
        self.created = int(time.time())

    def models(self) -> dict[str, Any]:
        card = {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "spyre_cb",
            "max_model_len": self.max_model_len,
        }
        return {"object": "list", "data": [card]}

    def check_model(self, model: str | None) -> None:
        """404 unless ``model`` names the served model (omitted: the served model)."""
        if model is not None and model != self.model_name:
            raise APIError(
                404,
                f"model {model!r} does not exist; this server serves {self.model_name!r}",
                "not_found_error",
                "model",
            )

    async def embeddings(self, body: EmbeddingRequest) -> Any:
        raise APIError(
            400,
            f"model {self.model_name!r} is generative: /v1/embeddings needs an embedding model",
            "invalid_request_error",
            "model",
        )


class EmbeddingServing(ServedModel):
    """The handlers of an embedding model's server: ``/v1/embeddings``; the
    generation endpoints answer 400."""

    def __init__(self, engine: AsyncEmbedder, options: ServerOptions) -> None:
        e = engine.engine
        super().__init__(options, str(e.config.model), e.tokenizer, e.config.max_model_len, e.vocab_size)
        self.engine = engine

    async def embeddings(self, body: EmbeddingRequest) -> Any:
        self.check_model(body.model)
        warn_unknown(body)
        inputs = body.inputs()
        if len(inputs) > MAX_INPUTS:
            raise APIError(
                400, f"input holds {len(inputs)} items; at most {MAX_INPUTS}", "invalid_request_error", "input"
            )
        embedder = self.engine.engine
        try:
            # tokenizing is CPU work: off the event loop
            ids = await asyncio.to_thread(lambda: [embedder.token_ids(x, i) for i, x in enumerate(inputs)])
            vectors = await self.engine.embed(ids, body.dimensions)
        except EngineDeadError as e:
            raise engine_dead(str(e)) from None
        except SpyreCBError as e:
            param = "dimensions" if "dimensions" in str(e) else "input"
            raise APIError(400, str(e), "invalid_request_error", param) from None
        data = []
        for i, v in enumerate(vectors):
            emb: Any = (
                base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()
                if body.encoding_format == "base64"
                else v.tolist()
            )
            data.append({"object": "embedding", "index": i, "embedding": emb})
        tokens = sum(len(x) for x in ids)
        rid = f"embd-{uuid.uuid4().hex[:16]}"
        access.note_totals(tokens, 0, request_id=rid)
        return {
            "id": rid,
            "object": "list",
            "created": int(time.time()),
            "data": data,
            "model": self.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    def _generative_only(self, endpoint: str) -> APIError:
        return APIError(
            400,
            f"model {self.model_name!r} is an embedding model: it serves /v1/embeddings, not {endpoint}",
            "invalid_request_error",
            "model",
        )

    async def completions(self, body: Any) -> Any:
        raise self._generative_only("/v1/completions")

    async def chat(self, body: Any) -> Any:
        raise self._generative_only("/v1/chat/completions")


__all__ = ["EmbeddingRequest", "EmbeddingServing", "MAX_INPUTS", "ServedModel"]
