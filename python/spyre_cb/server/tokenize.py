"""The tokenizer endpoints vLLM users call: ``/tokenize``, ``/detokenize``,
``/tokenizer_info`` (lm-eval's ``tokenizer_backend=remote`` reads it), and
``/version``. Request and response shapes are vLLM's."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from spyre_cb import __version__
from spyre_cb.server.errors import APIError
from spyre_cb.server.protocol import ChatMessage, ChatRequest, _check, _check_length, chat_prompt, warn_unknown

router = APIRouter()


class TokenizeCompletion(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChat(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class Detokenize(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    tokens: list[StrictInt]


def _serving(request: Request) -> Any:
    return request.app.state.serving


@router.post("/tokenize")
async def tokenize(body: TokenizeCompletion | TokenizeChat, request: Request) -> dict[str, Any]:
    serving = _serving(request)
    tok, mml = serving.tokenizer, serving.max_model_len
    serving.check_model(body.model)
    warn_unknown(body)
    if tok is None:
        raise APIError(400, "this model has no tokenizer", "invalid_request_error")

    def run() -> list[int]:
        if isinstance(body, TokenizeChat):
            chat = ChatRequest(
                messages=body.messages,
                add_generation_prompt=body.add_generation_prompt,
                continue_final_message=body.continue_final_message,
                chat_template=body.chat_template,
                chat_template_kwargs=body.chat_template_kwargs,
            )
            return chat_prompt(chat, tok, mml)
        _check(body.prompt, "prompt", "prompt")
        _check_length(len(body.prompt), mml, "prompt")
        return list(tok(body.prompt, add_special_tokens=body.add_special_tokens).input_ids)

    ids = await asyncio.to_thread(run)
    out: dict[str, Any] = {"count": len(ids), "max_model_len": mml, "tokens": ids, "token_strs": None}
    if body.return_token_strs:
        out["token_strs"] = tok.convert_ids_to_tokens(ids)
    return out


@router.post("/detokenize")
async def detokenize(body: Detokenize, request: Request) -> dict[str, str]:
    serving = _serving(request)
    serving.check_model(body.model)
    warn_unknown(body)
    tok = serving.tokenizer
    if tok is None:
        raise APIError(400, "this model has no tokenizer", "invalid_request_error")
    vocab = serving.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(
            400, f"token {bad[0]} is outside the vocabulary (ids 0..{vocab - 1})", "invalid_request_error", "tokens"
        )
    return {"prompt": tok.decode(body.tokens)}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> dict[str, Any]:
    """The tokenizer's configuration (``tokenizer_config.json``'s fields), as vLLM returns it."""
    tok = _serving(request).tokenizer
    if tok is None:
        raise APIError(404, "this model has no tokenizer", "not_found_error")
    info: dict[str, Any] = {k: _jsonable(v) for k, v in getattr(tok, "init_kwargs", {}).items()}
    info["tokenizer_class"] = type(tok).__name__
    info.setdefault("model_max_length", _serving(request).max_model_len)
    if getattr(tok, "chat_template", None):
        info["chat_template"] = tok.chat_template
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = getattr(tok, name, None)
        if value is not None:
            info[name] = str(value)
    return info


def _jsonable(v: Any) -> Any:
    """A tokenizer config value as JSON: added tokens by their text, keys as strings."""
    if isinstance(v, (str, int, float, bool, type(None))):
        return v
    if hasattr(v, "content") and isinstance(v.content, str):  # an AddedToken
        return v.content
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return str(v)


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": __version__}


__all__ = ["router"]
