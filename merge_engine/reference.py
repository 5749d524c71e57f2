"""Model references as recipes write them (mergekit's ModelReference syntax), parsed without touching disk.

    path/to/model                  a local directory
    org/name  org/name@revision    a Hugging Face hub repository (branch, tag or commit sha)
    base+path/to/adapter           a PEFT LoRA adapter applied to base (either side may be a hub id@revision)

mergekit's structured form ``{model: {path: ..., revision: ...}, lora: {path: ..., revision: ...}}`` is
normalised to the same string, so the rest of the engine sees one string per model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelPath:
    path: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.path}@{self.revision}" if self.revision else self.path


@dataclass(frozen=True)
class ModelReference:
    model: ModelPath
    lora: ModelPath | None = None

    def __str__(self) -> str:
        return f"{self.model}+{self.lora}" if self.lora else str(self.model)


def _parse_path(text: str, whole: str) -> ModelPath:
    if not text:
        raise ValueError(f"model reference {whole!r}: empty path (expected 'model', 'model@revision' or "
                         "'model+adapter')")
    if text.count("@") > 1:
        raise ValueError(f"model reference {whole!r}: more than one '@' in {text!r} (expected path@revision)")
    path, _, revision = text.partition("@")
    if not path or (text.count("@") == 1 and not revision):
        raise ValueError(f"model reference {whole!r}: {text!r} needs both a path and a revision around '@'")
    return ModelPath(path, revision or None)


def parse_reference(text: str) -> ModelReference:
    """'model[@rev][+adapter[@rev]]' -> ModelReference (as mergekit splits it: on '+', then on '@')."""
    parts = text.split("+")
    if len(parts) > 2:
        raise ValueError(f"model reference {text!r}: more than one '+' (expected base+adapter)")
    model = _parse_path(parts[0], text)
    lora = _parse_path(parts[1], text) if len(parts) == 2 else None
    return ModelReference(model, lora)


def _path_from_mapping(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        unknown = set(value) - {"path", "revision"}
        if unknown or "path" not in value:
            raise ValueError(f"{where}: expected {{path: ..., revision: ...}}, got keys {sorted(value)}")
        return str(ModelPath(str(value["path"]), value.get("revision")))
    raise ValueError(f"{where}: expected a string or {{path: ..., revision: ...}}, got {value!r}")


def normalize_reference(value: Any) -> Any:
    """A recipe's model field (string or mergekit's structured mapping) -> the reference string.
    Anything else is returned unchanged for the schema to reject."""
    if not isinstance(value, dict):
        return value
    if "override_architecture" in value:
        raise ValueError("override_architecture is not supported: evomerge detects the architecture from "
                         "the tensor names; remove the field")
    unknown = set(value) - {"model", "lora"}
    if unknown or "model" not in value:
        raise ValueError(f"expected {{model: ..., lora: ...}} (mergekit's ModelReference), got keys {sorted(value)}")
    text = _path_from_mapping(value["model"], "model")
    if value.get("lora") is not None:
        text += "+" + _path_from_mapping(value["lora"], "lora")
    parse_reference(text)  # reject malformed pieces here, with the YAML path
    return text
