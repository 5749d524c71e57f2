"""Checks of the non-weight outputs that run before the first tensor is read, so that a bad
tokenizer source or chat template fails in a second instead of after the whole merge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .loader import ModelLoadError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


def check_tokenizer(path: Path, name: str, chat_template: str | None, trust_remote_code: bool) -> None:
    """The tokenizer in `path` (the recipe's model `name`) exists, needs no remote code unless allowed,
    and loads; the recipe's chat_template is a known name or a Jinja template that compiles. Raises
    ModelLoadError."""
    check_tokenizer_files(path, name, trust_remote_code)
    if chat_template is not None:
        check_chat_template(chat_template)
    load_tokenizer(path, name, trust_remote_code)


def check_tokenizer_files(path: Path, name: str, trust_remote_code: bool) -> None:
    """`path` has tokenizer files, and they need no remote code unless allowed."""
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(f"tokenizer_source {name!r}: no tokenizer files in {path} (expected one of "
                             f"{', '.join(TOKENIZER_FILES)}); set tokenizer_source to a model that has a "
                             "tokenizer, or pass --no-copy-tokenizer")
    tok_config = path / "tokenizer_config.json"
    if tok_config.is_file() and not trust_remote_code:
        try:
            data = json.loads(tok_config.read_text())
        except (ValueError, OSError) as e:
            raise ModelLoadError(f"tokenizer_source {name!r}: {tok_config} is not valid JSON: {e}") from None
        if isinstance(data, dict) and data.get("auto_map"):
            raise ModelLoadError(f"tokenizer_source {name!r}: {tok_config} has an auto_map, i.e. the "
                                 "tokenizer runs code shipped with the model; pass --trust-remote-code if you "
                                 "trust it, or --no-copy-tokenizer")


def load_tokenizer(path: Path, name: str, trust_remote_code: bool) -> Any:
    """The transformers tokenizer in `path`, after check_tokenizer_files; a load failure is one
    ModelLoadError naming the model."""
    check_tokenizer_files(path, name, trust_remote_code)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any load failure, reported with the model named
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"tokenizer_source {name!r}: the tokenizer in {path} does not load: "
                             f"{first}; fix it, choose another tokenizer_source, or pass --no-copy-tokenizer") from None


def check_chat_template(chat_template: str) -> None:
    from .artifacts import CHAT_TEMPLATES

    if chat_template == "auto" or chat_template in CHAT_TEMPLATES:
        return
    if "{%" not in chat_template and "{{" not in chat_template:
        raise ValueError(f"chat_template: {chat_template!r} is neither a known template "
                         f"({', '.join(CHAT_TEMPLATES)}, auto) nor a Jinja template")
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment().parse(chat_template)
    except TemplateSyntaxError as e:
        raise ValueError(f"chat_template: not a valid Jinja template: {e.message} (line {e.lineno})") from None


def output_bytes(tensor_bytes: int, tokenizer_dir: Path | None) -> int:
    """What the output will take on disk: the tensors, their headers and the small files."""
    small = 1 << 20
    if tokenizer_dir is not None:
        small += sum((tokenizer_dir / f).stat().st_size for f in TOKENIZER_FILES if (tokenizer_dir / f).is_file())
    return tensor_bytes + small
