"""A Hugging Face checkpoint directory, checked before anything is loaded.

Everything the engine needs to know about a checkpoint besides its weights
comes from here: that the directory is complete and readable, that its
architecture is one whose outputs this project has verified token-exact
against transformers, how long a sequence its position table allows, its
tokenizer, and every id that ends generation (EOS). Every problem is a
:class:`~spyre_cb.errors.ConfigError` that names the file and what is wrong.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spyre_cb.errors import ConfigError

#: Architectures whose outputs tests check token for token against
#: transformers (``tests/test_models.py``), by ``config.json`` ``architectures``.
VERIFIED_ARCHITECTURES = ("GraniteForCausalLM", "LlamaForCausalLM", "MistralForCausalLM")
#: Encoder (embedding) architectures, checked against transformers by
#: ``tests/test_embedding.py``, and the FMS model family each loads as.
ENCODER_ARCHITECTURES = {"RobertaModel": "roberta", "XLMRobertaModel": "roberta", "BertModel": "bert"}


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: dict[str, Any]
    architecture: str
    max_position_embeddings: int | None

    @classmethod
    def open(cls, model: str | os.PathLike[str], *, allow_unverified: bool = False) -> Checkpoint:
        path = Path(model)
        if not path.is_dir():
            raise ConfigError(f"model directory {str(path)!r} does not exist")
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ConfigError(f"model directory {str(path)!r} has no config.json: not a Hugging Face checkpoint")
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise ConfigError(f"model directory {str(path)!r} holds no weights (*.safetensors or *.bin)")
        try:
            config = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise ConfigError(f"{cfg_file}: not a readable JSON config ({type(e).__name__}: {e})") from None
        if not isinstance(config, dict):
            raise ConfigError(f"{cfg_file}: expected a JSON object, got {type(config).__name__}")
        archs = config.get("architectures")
        arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
        if arch is None:
            raise ConfigError(f"{cfg_file}: names no architecture (the 'architectures' list is missing)")
        if arch not in VERIFIED_ARCHITECTURES and arch not in ENCODER_ARCHITECTURES:
            msg = (
                f"architecture {arch} is not verified by spyre_cb (its outputs are not checked against "
                f"transformers); verified: {', '.join([*VERIFIED_ARCHITECTURES, *ENCODER_ARCHITECTURES])}"
            )
            if not allow_unverified:
                raise ConfigError(msg + "; pass allow_unverified_architectures=True to run it anyway")
            warnings.warn(msg + "; running it anyway, outputs may differ from transformers", stacklevel=3)
        positions = config.get("max_position_embeddings")
        positions = positions if isinstance(positions, int) and not isinstance(positions, bool) else None
        return cls(path, config, arch, positions)

    @property
    def is_encoder(self) -> bool:
        """An embedding (encoder) model, run by :class:`~spyre_cb.embedding.Embedder`."""
        return self.architecture in ENCODER_ARCHITECTURES

    def encoder_positions(self) -> int | None:
        """The tokens an encoder's position table holds (RoBERTa's table starts
        after the padding id: two rows fewer)."""
        if self.max_position_embeddings is None:
            return None
        offset = 2 if ENCODER_ARCHITECTURES.get(self.architecture) == "roberta" else 0
        return self.max_position_embeddings - offset

    def check_max_model_len(self, max_model_len: int) -> None:
        if self.max_position_embeddings is not None and max_model_len > self.max_position_embeddings:
            raise ConfigError(
                f"max_model_len {max_model_len} exceeds the model's max_position_embeddings "
                f"{self.max_position_embeddings} ({self.path / 'config.json'})"
            )

    def stored_weights(self) -> int | None:
        """Weights stored in the safetensors files, read from their headers
        (None for ``*.bin`` checkpoints)."""
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            return None
        from safetensors import safe_open

        total = 0
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    n = 1
                    for d in st.get_slice(name).get_shape():
                        n *= d
                    total += n
        return total

    def load_tokenizer(self) -> Any:
        """The checkpoint's tokenizer, or None when it ships none (token ids only)."""
        if not (self.path / "tokenizer.json").exists() and not (self.path / "tokenizer_config.json").exists():
            return None
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(self.path))
        except Exception as e:  # noqa: BLE001 (any failure means the files are unusable)
            raise ConfigError(
                f"the tokenizer files in {str(self.path)!r} are corrupt or unreadable: {type(e).__name__}: {e}"
            ) from None

    def eos_token_ids(self, tokenizer: Any) -> frozenset[int]:
        """Every id that ends generation: the union of ``generation_config.json``'s,
        ``config.json``'s (each an int or a list) and the tokenizer's EOS."""
        ids: set[int] = set()

        def add(value: object) -> None:
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                    ids.add(v)

        add(self.config.get("eos_token_id"))
        gen_file = self.path / "generation_config.json"
        if gen_file.is_file():
            try:
                from transformers import GenerationConfig

                add(GenerationConfig.from_pretrained(str(self.path)).eos_token_id)
            except Exception as e:  # noqa: BLE001
                raise ConfigError(f"{gen_file}: unreadable ({type(e).__name__}: {e})") from None
        if tokenizer is not None:
            add(getattr(tokenizer, "eos_token_id", None))
        return frozenset(ids)


__all__ = ["Checkpoint", "ENCODER_ARCHITECTURES", "VERIFIED_ARCHITECTURES"]
