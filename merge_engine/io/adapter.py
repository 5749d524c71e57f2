"""The files of an extracted LoRA adapter (mergekit-extract-lora): one ``adapter_model.safetensors`` whose
tensor shapes are found only while it is written, ``adapter_config.json``, the energy report and a card.

peft reads exactly one ``adapter_model.safetensors``, so the adapter is never sharded. A safetensors header
lists every tensor's shape and offsets before the data, and a module's rank is known only after its SVD
(``--sv-epsilon``), so the data is appended to a spool file beside the target as tensors arrive and the file
is assembled (header, then the spool copied after it) once the last one has come: peak memory stays one
tensor, never the adapter.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import torch
import transformers

from ..dtypes import SAFETENSORS_CODES

ADAPTER_SAFE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
REPORT = "extraction_report.json"
CARD = "README.md"


class SpooledSafetensorsWriter:
    """A TensorSink writing one safetensors file; tensors come one at a time, in any shapes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._spool_path = self.path.with_name(self.path.name + ".spool")
        self._spool = open(self._spool_path, "wb")  # noqa: SIM115 - closed by finish/abort
        self._entries: dict[str, dict[str, Any]] = {}
        self._offset = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._entries:
            raise RuntimeError(f"adapter writer: tensor {name!r} written twice")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._spool.write(data.numpy().data)
        n = data.numel()
        self._entries[name] = {"dtype": SAFETENSORS_CODES[tensor.dtype], "shape": list(tensor.shape),
                               "data_offsets": [self._offset, self._offset + n]}
        self._offset += n

    def finish(self) -> Path:
        """Header, then the spooled data; the spool file is removed."""
        self._spool.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # align the data section to 8 bytes
        with open(self.path, "wb") as out, open(self._spool_path, "rb") as spool:
            out.write(struct.pack("<Q", len(header)) + header)
            shutil.copyfileobj(spool, out, 16 << 20)
        self._spool_path.unlink()
        return self.path

    def abort(self) -> None:
        self._spool.close()
        self._spool_path.unlink(missing_ok=True)


def model_config(path: Path, trust_remote_code: bool = False) -> transformers.PretrainedConfig:
    """The transformers config of a model directory (to build its module tree on the meta device)."""
    return transformers.AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
