"""Tiny offline checkpoints for tests and demos.

No model can be downloaded here, so tests build a random-weight decoder and a
locally trained tokenizer and save them exactly as a real Hugging Face
checkpoint is laid out (``config.json``, ``model.safetensors``, tokenizer
files). Engines then load them through the same path a real checkpoint (for
example granite-3.3-8b-instruct) takes: FMS ``get_model(architecture=
"hf_pretrained", model_path=...)`` and ``transformers.AutoTokenizer``.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ("<|pad|>", "<|endoftext|>")
_ARCHS = ("granite", "llama", "mistral")
_ENCODER_ARCHS = ("roberta", "xlm-roberta", "bert")
#: the pooling modes of sentence-transformers' ``1_Pooling/config.json`` that spyre_cb runs
POOLING_MODES = ("cls", "mean", "max")


def _corpus() -> list[str]:
    text = resources.files("spyre_cb").joinpath("data/corpus.txt").read_text(encoding="utf-8")
    return [p for p in text.split("\n\n") if p.strip()]


def cache_dir() -> Path:
    """Where built models are kept: ``$SPYRE_CB_CACHE`` or ``~/.cache/spyre_cb``."""
    root = os.environ.get("SPYRE_CB_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "spyre_cb"


def tiny_model_path(seed: int = 0, arch: str = "granite") -> Path:
    """The default tiny checkpoint, built once into the cache directory."""
    return _built(f"tiny-{arch}-seed{seed}-v2", lambda d: make_tiny_checkpoint(d, seed=seed, arch=arch))


def tiny_embedding_model_path(seed: int = 0, arch: str = "roberta") -> Path:
    """The tiny encoder (embedding) checkpoint, built once into the cache directory."""
    return _built(f"tiny-embed-{arch}-seed{seed}-v1", lambda d: make_tiny_encoder_checkpoint(d, seed=seed, arch=arch))


def _built(name: str, make: Any) -> Path:
    """``cache_dir() / name``, made by ``make(directory)`` once (atomically)."""
    import shutil
    import tempfile

    target = cache_dir() / name
    if (target / "spyre_cb_tiny.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        make(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race
            if not (target / "spyre_cb_tiny.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


#: The tiny model's chat template: each message as ``<|role|>content<|endoftext|>``.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _trained_bpe(vocab_size: int, special: list[str]) -> Any:
    """A byte-level BPE trained on the package's own text, with ``special`` tokens first."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        _corpus(), vocab_size=vocab_size, min_frequency=1, special_tokens=special, show_progress=False
    )
    return bpe


def build_tokenizer(vocab_size: int = 512, *, add_bos: bool = False) -> Any:
    """A byte-level BPE tokenizer trained on the package's own text.

    With ``add_bos`` it has its own ``<|bos|>`` token and puts it before every
    text it encodes (as Llama's and Mistral's tokenizers do).
    """
    from transformers import PreTrainedTokenizerFast

    special = [*SPECIAL_TOKENS, "<|bos|>"] if add_bos else list(SPECIAL_TOKENS)
    bpe = _trained_bpe(vocab_size, special)
    bos = "<|bos|>" if add_bos else "<|endoftext|>"
    if add_bos:
        from tokenizers.processors import TemplateProcessing

        bpe._tokenizer.post_processor = TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bpe.token_to_id(bos))]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        pad_token="<|pad|>",
        eos_token="<|endoftext|>",
        bos_token=bos,
        unk_token=None,
    )
    tok.model_max_length = 1 << 20
    # a minimal role-tagged template, so chat endpoints work on the offline model
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_tiny_checkpoint(
    directory: str | os.PathLike,
    *,
    seed: int = 0,
    arch: str = "granite",
    num_layers: int = 2,
    hidden_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    vocab_size: int = 512,
    max_position_embeddings: int = 4096,
    init_gain: float = 2.0,
    add_bos: bool = False,
    model_vocab_size: int | None = None,
    dtype: str = "float32",
) -> Path:
    """Writes a random-weight decoder checkpoint and its tokenizer to ``directory``.

    Deterministic for a given ``seed`` and arguments. Embeddings are untied
    and every matrix is drawn from N(0, (init_gain / sqrt(fan_in))^2), large
    enough that greedy decoding produces varied tokens (a tied, small-init
    random model repeats one token, which would make token-equality checks
    weak). ``arch`` is ``"granite"``, ``"llama"`` or ``"mistral"``.
    ``model_vocab_size`` pads the embedding and output rows past the
    tokenizer's (a real model's table size, for benchmarks); ``dtype`` is what
    the weights are saved in (``"float32"`` or ``"bfloat16"``).
    """
    import torch
    import transformers

    if arch not in _ARCHS:
        raise ValueError(f"arch must be one of {_ARCHS}, got {arch!r}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(vocab_size, add_bos=add_bos)
    common = dict(
        vocab_size=max(len(tok), model_vocab_size or 0),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        initializer_range=0.02,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        torch_dtype=dtype,
    )
    config: Any
    if arch == "granite":
        config = transformers.GraniteConfig(
            **common,
            embedding_multiplier=1.0,
            residual_multiplier=1.0,
            attention_multiplier=(hidden_size // num_heads) ** -0.5,
            logits_scaling=1.0,
        )
        model_cls: Any = transformers.GraniteForCausalLM
    elif arch == "mistral":
        config = transformers.MistralConfig(**common, sliding_window=None, head_dim=hidden_size // num_heads)
        model_cls = transformers.MistralForCausalLM
    else:
        config = transformers.LlamaConfig(**common)
        model_cls = transformers.LlamaForCausalLM
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (init_gain / p.shape[-1] ** 0.5))
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "spyre_cb_tiny.json").write_text(json.dumps({"seed": seed, "arch": arch}) + "\n")
    return out


def build_encoder_tokenizer(vocab_size: int = 512, *, arch: str = "roberta") -> Any:
    """A byte-level BPE tokenizer for an encoder, trained on the package's own
    text: RoBERTa's special tokens (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2) and
    ``<s> text </s>``, or BERT's (``[PAD]`` 0, ``[CLS]``, ``[SEP]``) and
    ``[CLS] text [SEP]``."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    if arch in ("roberta", "xlm-roberta"):
        special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        cls_t, pad_t, sep_t, unk_t, mask_t = special
    else:
        special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        pad_t, unk_t, cls_t, sep_t, mask_t = special
    bpe = _trained_bpe(vocab_size, special)
    bpe._tokenizer.post_processor = TemplateProcessing(
        single=f"{cls_t} $A {sep_t}",
        pair=f"{cls_t} $A {sep_t} $B {sep_t}",
        special_tokens=[(cls_t, bpe.token_to_id(cls_t)), (sep_t, bpe.token_to_id(sep_t))],
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        pad_token=pad_t,
        cls_token=cls_t,
        sep_token=sep_t,
        unk_token=unk_t,
        mask_token=mask_t,
        bos_token=cls_t,
        eos_token=sep_t,
    )
    tok.model_max_length = 1 << 20
    return tok


def make_tiny_encoder_checkpoint(
    directory: str | os.PathLike,
    *,
    seed: int = 0,
    arch: str = "roberta",
    pooling: str = "cls",
    normalize: bool = True,
    num_layers: int = 2,
    hidden_size: int = 128,
    num_heads: int = 4,
    vocab_size: int = 512,
    max_position_embeddings: int = 512,
    init_gain: float = 1.0,
) -> Path:
    """Writes a random-weight encoder checkpoint (``RobertaModel``,
    ``XLMRobertaModel`` or ``BertModel``: ``arch`` ``"roberta"``,
    ``"xlm-roberta"``, ``"bert"``, as granite-embedding's English and
    multilingual models and BERT-style embedding models are laid out), its tokenizer, and sentence-transformers' pooling files
    (``modules.json``, ``1_Pooling/config.json``, ``2_Normalize`` when
    ``normalize``) to ``directory``. Deterministic for a given ``seed``."""
    import torch
    import transformers

    if arch not in _ENCODER_ARCHS:
        raise ValueError(f"arch must be one of {_ENCODER_ARCHS}, got {arch!r}")
    if pooling not in POOLING_MODES:
        raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_encoder_tokenizer(vocab_size, arch=arch)
    common = dict(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=4 * hidden_size,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
        torch_dtype="float32",
    )
    config: Any
    if arch in ("roberta", "xlm-roberta"):
        # RoBERTa's positions start after the padding id: two more rows than tokens
        xlm = arch == "xlm-roberta"
        config_cls = transformers.XLMRobertaConfig if xlm else transformers.RobertaConfig
        config = config_cls(**common, max_position_embeddings=max_position_embeddings + 2)
        model_cls = transformers.XLMRobertaModel if xlm else transformers.RobertaModel
        model: Any = model_cls(config, add_pooling_layer=False)
    else:
        config = transformers.BertConfig(**common, max_position_embeddings=max_position_embeddings)
        model = transformers.BertModel(config, add_pooling_layer=False)
    torch.manual_seed(seed)
    model = model.to(torch.float32).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (init_gain / p.shape[-1] ** 0.5))
            elif "LayerNorm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (out / "2_Normalize").mkdir(exist_ok=True)
    (out / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    (out / "1_Pooling").mkdir(exist_ok=True)
    pool = {"word_embedding_dimension": hidden_size}
    pool["pooling_mode_cls_token"] = pooling == "cls"
    pool["pooling_mode_mean_tokens"] = pooling == "mean"
    pool["pooling_mode_max_tokens"] = pooling == "max"
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pool, indent=2) + "\n")
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_position_embeddings}) + "\n")
    (out / "spyre_cb_tiny.json").write_text(json.dumps({"seed": seed, "arch": arch, "pooling": pooling}) + "\n")
    return out
