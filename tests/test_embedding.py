"""Embedding models: an encoder checkpoint (RobertaModel, BertModel) loaded
through FMS, batched by the core's pooling plan, pooled as its
sentence-transformers files say; equal to transformers' ``AutoModel`` with
the same pooling. ``LLM.embed`` and the server's ``/v1/embeddings`` (driven
with the real ``openai`` client)."""

from __future__ import annotations

import asyncio
import base64
import json
import random

import numpy as np
import pytest
import torch

from spyre_cb import LLM, Engine, _core
from spyre_cb.embedding import Embedder, Pooling
from spyre_cb.errors import ConfigError, InvalidRequestError
from spyre_cb.models import make_tiny_encoder_checkpoint


def _reference(path, ids: list[list[int]], mode: str) -> torch.Tensor:
    """transformers' AutoModel over each input alone (no padding), pooled by ``mode``, normalised."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, add_pooling_layer=False).eval()
    out = []
    with torch.no_grad():
        for x in ids:
            h = model(input_ids=torch.tensor([x])).last_hidden_state[0]
            v = {"cls": h[0], "mean": h.mean(0), "max": h.amax(0)}[mode]
            out.append(torch.nn.functional.normalize(v, dim=-1))
    return torch.stack(out)


def _inputs(n: int, vocab: int, seed: int, longest: int = 300) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, vocab) for _ in range(rng.randint(1, longest))] for _ in range(n)]


@pytest.mark.parametrize(
    "arch,mode,dtype_ops",
    [
        ("roberta", "cls", "onednn"),
        ("bert", "mean", "torch"),
        ("roberta", "max", "auto"),
        ("xlm-roberta", "cls", "auto"),
    ],
)
def test_embeddings_equal_transformers(tmp_path, arch, mode, dtype_ops):
    path = make_tiny_encoder_checkpoint(tmp_path / arch, arch=arch, pooling=mode, seed=3)
    ops = dtype_ops if dtype_ops != "onednn" or torch.backends.mkldnn.is_available() else "torch"
    with Embedder(path, max_num_seqs=4, linear_ops=ops) as emb:
        assert emb.pooling == Pooling(mode, True)
        ids = _inputs(32, emb.vocab_size, seed=7)
        got = emb.embed_token_ids(ids)
        plan = _core.plan_pooling([len(x) for x in ids], emb.config.scheduler)
        assert emb.batches_run == len(plan)  # one forward per planned static shape
        assert all(p % 64 == 0 and len(rows) <= 4 for rows, p in plan)
    ref = _reference(path, ids, mode)
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    assert cos.min().item() > 1 - 1e-4, cos.min().item()
    assert torch.allclose(got.norm(dim=-1), torch.ones(32), atol=1e-5)


def test_strings_tokenized_with_special_tokens_and_llm_embed(tmp_path):
    path = make_tiny_encoder_checkpoint(tmp_path / "m", arch="roberta", pooling="cls")
    llm = LLM(str(path), max_num_seqs=2)
    texts = ["the cat sat on the mat", "a", "continuous batching on static shapes " * 10]
    outs = llm.embed(texts)
    tok = llm.get_tokenizer()
    ids = [tok(t)["input_ids"] for t in texts]
    assert [o.prompt_token_ids for o in outs] == ids
    assert ids[0][0] == tok.cls_token_id and ids[0][-1] == tok.sep_token_id
    ref = _reference(path, ids, "cls")
    got = torch.tensor([o.outputs.embedding for o in outs])
    assert torch.nn.functional.cosine_similarity(got, ref, dim=-1).min() > 1 - 1e-4
    # token ids in, the same vector out; a single prompt is a batch of one
    assert llm.embed(ids[1])[0].embedding == outs[1].embedding
    with pytest.raises(InvalidRequestError, match="embedding model"):
        llm.generate("x")


def test_bad_inputs_name_the_limit_and_the_embedder_serves_on(tmp_path):
    path = make_tiny_encoder_checkpoint(tmp_path / "m")
    emb = Embedder(path, max_model_len=128)
    with pytest.raises(InvalidRequestError, match="input 1 is empty"):
        emb.embed(["ok", ""])
    with pytest.raises(InvalidRequestError, match="input 0 is empty"):
        emb.embed_token_ids([[]])
    with pytest.raises(InvalidRequestError, match="129 tokens, more than max_model_len 128"):
        emb.embed([[7] * 129])
    with pytest.raises(InvalidRequestError, match=r"input\[0\]\[1\] = 512 is outside the model's vocabulary"):
        emb.embed([[7, emb.vocab_size]])
    with pytest.raises(InvalidRequestError, match="not a Matryoshka model"):
        emb.embed("x", dimensions=16)
    assert len(emb.embed([[7] * 128])[0].embedding) == emb.hidden_size


def test_matryoshka_dimensions(tmp_path):
    path = make_tiny_encoder_checkpoint(tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["matryoshka_dimensions"] = [32, 64, 128]
    (path / "config.json").write_text(json.dumps(cfg))
    emb = Embedder(path)
    full = emb.embed_token_ids([[5, 6, 7, 8]])
    short = emb.embed_token_ids([[5, 6, 7, 8]], dimensions=32)
    assert short.shape == (1, 32)
    assert torch.allclose(short, torch.nn.functional.normalize(full[:, :32], dim=-1), atol=1e-6)
    with pytest.raises(InvalidRequestError, match="32, 64, 128"):
        emb.embed_token_ids([[5]], dimensions=48)


def test_pooling_config_is_read_or_refused(tmp_path):
    path = make_tiny_encoder_checkpoint(tmp_path / "m", pooling="mean", normalize=False)
    assert Pooling.of(path) == Pooling("mean", False)
    pool_file = path / "1_Pooling" / "config.json"
    cfg = json.loads(pool_file.read_text())
    pool_file.write_text(json.dumps({**cfg, "pooling_mode_cls_token": True}))
    with pytest.raises(ConfigError, match="cls_token"):
        Pooling.of(path)
    modules = json.loads((path / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ConfigError, match="Dense"):
        Pooling.of(path)
    (path / "modules.json").unlink()
    assert Pooling.of(path) == Pooling("cls", True)  # no sentence-transformers files: CLS, normalised


def test_generation_and_embedding_models_refuse_each_others_role(tmp_path, tiny_model):
    path = make_tiny_encoder_checkpoint(tmp_path / "m")
    with pytest.raises(ConfigError, match="embedding model"):
        Engine(str(path))
    with pytest.raises(ConfigError, match="generative model"):
        Embedder(str(tiny_model))
    with pytest.raises(InvalidRequestError, match="generative"):
        LLM(str(tiny_model)).embed("x")
    with pytest.raises(ConfigError, match="positions"):
        Embedder(path, max_model_len=1024)


def test_async_embedder_batches_concurrent_requests(tmp_path):
    from spyre_cb.embedding import AsyncEmbedder

    path = make_tiny_encoder_checkpoint(tmp_path / "m")
    emb = Embedder(path, max_num_seqs=8)
    ids = _inputs(12, emb.vocab_size, seed=1, longest=60)  # one bucket of 64
    alone = emb.embed_token_ids(ids)
    aemb = AsyncEmbedder(emb)
    try:

        async def run() -> list[torch.Tensor]:
            return await asyncio.wait_for(asyncio.gather(*(aemb.embed([x]) for x in ids)), 60)

        before = emb.batches_run
        got = asyncio.run(run())
        assert torch.allclose(torch.cat(got), alone, atol=1e-5)
        assert emb.batches_run - before < len(ids)  # requests that waited together ran together
    finally:
        aemb.shutdown()


# ----- the server ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    from test_server import Server

    s = Server(tmp_path_factory.mktemp("embed"), "--max-model-len", "128", model="tiny-embed")
    yield s
    s.stop()


def test_server_embeddings_with_the_openai_client(server, monkeypatch):
    import openai

    client = server.client()
    # the same checkpoint the server built, in this process
    from spyre_cb.models import tiny_embedding_model_path

    monkeypatch.setenv("SPYRE_CB_CACHE", str(server.log_path.parent))
    local = Embedder(tiny_embedding_model_path(), max_model_len=128)
    texts = ["hello world", "static shapes", "x" * 40]
    want = local.embed(texts)
    # not told, the client asks for base64 and decodes it; told, it hands the text over
    for fmt in (openai.NOT_GIVEN, "float", "base64"):
        r = client.embeddings.create(model="tiny-embed", input=texts, encoding_format=fmt)
        assert [d.index for d in r.data] == [0, 1, 2]
        for d, w in zip(r.data, want, strict=True):
            got = d.embedding
            if fmt == "base64":
                got = np.frombuffer(base64.b64decode(got), dtype="<f4").tolist()
            assert torch.allclose(torch.tensor(got), torch.tensor(w.embedding), atol=1e-5)
        assert r.usage.prompt_tokens == sum(len(w.prompt_token_ids) for w in want)
    r = client.embeddings.create(model="tiny-embed", input=texts[0])
    assert len(r.data) == 1 and len(r.data[0].embedding) == local.hidden_size
    ids = want[1].prompt_token_ids
    for inp in (ids, [ids, ids]):
        r = client.embeddings.create(model="tiny-embed", input=inp)
        assert torch.allclose(torch.tensor(r.data[-1].embedding), torch.tensor(want[1].embedding), atol=1e-5)
    for bad, match in (
        ("", "input 0 is empty"),
        ([[5] * 129], "more than max_model_len 128"),
        ([], "empty list"),
    ):
        with pytest.raises(openai.BadRequestError, match=match):
            client.embeddings.create(model="tiny-embed", input=bad)
    with pytest.raises(openai.BadRequestError, match="Matryoshka"):
        client.embeddings.create(model="tiny-embed", input="x", dimensions=8)
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client.completions.create(model="tiny-embed", prompt="x", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="other", input="x")
    assert [m.id for m in client.models.list().data] == ["tiny-embed"]
    assert server.metric("spyre_cb_embedding_inputs_total") >= 9


def test_async_embedder_fails_waiting_callers_when_it_stops(tmp_path):
    """A failing hook never stops it; a thread that dies, or a shutdown, fails every
    caller still waiting (an EngineDeadError, never a hang) and refuses new ones."""
    from spyre_cb.embedding import AsyncEmbedder
    from spyre_cb.errors import EngineDeadError

    emb = Embedder(make_tiny_encoder_checkpoint(tmp_path / "m"))
    aemb = AsyncEmbedder(emb)

    def bad_hook(inputs: int, tokens: int) -> None:
        raise RuntimeError("metrics broke")

    aemb.on_batch.append(bad_hook)

    async def one() -> torch.Tensor:
        return await asyncio.wait_for(aemb.embed([[5, 6, 7]]), 60)

    assert asyncio.run(one()).shape == (1, emb.hidden_size)  # the hook failed, the answer came
    original = emb.embed_token_ids

    def die(*a, **k):
        raise SystemExit("the thread dies")  # not an Exception: the round's own handler lets it through

    emb.embed_token_ids = die  # type: ignore[method-assign]
    with pytest.raises(EngineDeadError, match="the thread dies"):
        asyncio.run(one())
    assert aemb.dead is not None
    with pytest.raises(EngineDeadError):
        asyncio.run(one())
    emb.embed_token_ids = original  # type: ignore[method-assign]
    aemb.shutdown()


def test_impossible_batch_limits_are_refused_at_start(tmp_path):
    with pytest.raises(ConfigError, match="max_batch_tkv_limit 100"):
        Embedder(make_tiny_encoder_checkpoint(tmp_path / "m"), max_model_len=256, max_batch_tkv_limit=100)
