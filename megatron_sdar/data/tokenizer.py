"""Tokenizers from local files only: a HF tokenizer directory or a SentencePiece model.

Nothing is ever fetched from a hub: a path that does not exist is an error that says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass
class LocalTokenizer:
    """The few things the data tools need from a tokenizer."""

    backend: Any
    kind: str  # "hf" or "sentencepiece"
    eod_id: int
    vocab_size: int
    pad_id: int | None = None

    def encode(self, text: str) -> list[int]:
        if self.kind == "hf":
            return self.backend.encode(text, add_special_tokens=False)
        return self.backend.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids)

    def special_token_ids(self) -> dict[str, int]:
        """Named special tokens in use (the mask token must differ from all of them)."""
        ids = {"end-of-document": self.eod_id}
        if self.pad_id is not None:
            ids["padding"] = self.pad_id
        return ids


KINDS = ("hf", "sentencepiece")


# files that hold a HF tokenizer's vocabulary (besides *.tiktoken)
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def has_tokenizer_files(folder: str) -> bool:
    """Whether ``folder`` holds a tokenizer's vocabulary. transformers builds a placeholder
    tokenizer from a model's config.json alone (one special token), which would tokenise silently
    to nothing."""
    if any(os.path.isfile(os.path.join(folder, n)) for n in VOCABULARY_FILES):
        return True
    return os.path.isdir(folder) and any(n.endswith(".tiktoken") for n in os.listdir(folder))


def load_tokenizer(path: str, eod_token: str | None = None, kind: str | None = None) -> LocalTokenizer:
    """Load a tokenizer from a HF directory (``tokenizer.json``/``tokenizer_config.json``) or a
    SentencePiece model file. ``eod_token`` overrides the end-of-document token.

    ``kind`` (``"hf"`` or ``"sentencepiece"``) says which one ``path`` must be; by default a directory
    is a HF tokenizer and a ``.model`` file a SentencePiece model.
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"tokenizer path {path!r} does not exist; pass a local HF tokenizer directory or a "
            "SentencePiece .model file (nothing is downloaded)"
        )
    if kind == "hf" and not os.path.isdir(path):
        raise ValueError(
            f"{path!r} is a file; a HF tokenizer is a directory (tokenizer.json, tokenizer_config.json)"
        )
    if kind == "sentencepiece" and os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory; a SentencePiece tokenizer is one model file (.model)")
    if kind == "hf" or (kind is None and os.path.isdir(path)):
        return _load_hf(path, eod_token)
    if kind == "sentencepiece" or path.endswith(".model"):
        return _load_sentencepiece(path, eod_token)
    raise ValueError(f"cannot tell the tokenizer type of {path!r}: expected a directory or a .model file")


def load_hf_tokenizer(folder: str):
    """A HF tokenizer from a local folder: refuses a folder without tokenizer files (transformers
    would build a placeholder from config.json) and never runs the folder's remote code (an SDAR
    export names its model's in config.json; a tokenizer needs none)."""
    try:
        from transformers import AutoTokenizer
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("HF tokenizers need `transformers`: pip install -e '.[hf]'") from err
    if not has_tokenizer_files(folder):
        raise ValueError(
            f"{folder} holds no tokenizer files (none of {', '.join(VOCABULARY_FILES)}); "
            "pass a folder that has them"
        )
    return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)


def _load_hf(path: str, eod_token: str | None) -> LocalTokenizer:
    tok = load_hf_tokenizer(path)
    if eod_token is not None:
        eod_id = tok.convert_tokens_to_ids(eod_token)
        if eod_id is None or eod_id == tok.unk_token_id:
            raise ValueError(f"end-of-document token {eod_token!r} is not in the tokenizer at {path}")
    elif tok.eos_token_id is not None:
        eod_id = tok.eos_token_id
    else:
        raise ValueError(f"the tokenizer at {path} has no eos token; name one with --eod-token")
    return LocalTokenizer(tok, "hf", int(eod_id), len(tok), tok.pad_token_id)


def _load_sentencepiece(path: str, eod_token: str | None) -> LocalTokenizer:
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as err:
        raise ValueError(f"{path} is not a SentencePiece model ({err})") from err
    if eod_token is not None:
        eod_id = sp.piece_to_id(eod_token)
        if eod_id == sp.unk_id():  # also what any out-of-vocabulary character encodes to
            raise ValueError(
                f"end-of-document token {eod_token!r} is not a piece of the SentencePiece model {path} "
                "(or is its unknown piece, which cannot mark document ends)"
            )
    elif sp.eos_id() >= 0:
        eod_id = sp.eos_id()
    else:
        raise ValueError(
            f"the SentencePiece model {path} has no end-of-document piece (its eos id is -1); "
            "name one of its pieces with --eod-token"
        )
    pad = sp.pad_id() if sp.pad_id() >= 0 else None
    return LocalTokenizer(sp, "sentencepiece", int(eod_id), sp.get_piece_size(), pad)
