"""Streaming, sharded safetensors output.

The plan knows every output tensor's name, shape and dtype before any data is read,
so the shard layout and each shard's header are fixed up front and tensors are then
written one at a time at their offsets: peak memory is one tensor, not one shard.
(safetensors' own ``save_file`` needs the whole shard in memory, hence this writer;
the files it writes are read back with ``safe_open`` in the tests.)
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import torch

from ..dtypes import SAFETENSORS_CODES


class TensorSink(Protocol):
    """Where merged tensors go: shards on disk, or a resident model in memory."""

    def write(self, name: str, tensor: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class TensorLayout:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(layouts: list[TensorLayout], max_shard_bytes: int) -> list[list[TensorLayout]]:
    """Greedy, order-preserving split into shards of at most max_shard_bytes
    (a single larger tensor gets a shard of its own)."""
    shards: list[list[TensorLayout]] = [[]]
    size = 0
    for t in layouts:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header(shard: list[TensorLayout]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in shard:
        header[t.name] = {"dtype": SAFETENSORS_CODES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def shard_filenames(n: int) -> list[str]:
    """The names of n output shards: model.safetensors alone, else model-XXXXX-of-YYYYY.safetensors."""
    return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


class ShardedSafetensorsWriter:
    """Writes the planned tensors, in plan order, into model-XXXXX-of-YYYYY.safetensors
    files plus model.safetensors.index.json (a single shard is named model.safetensors)."""

    def __init__(self, out_dir: Path, layouts: list[TensorLayout], max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        self.shards = plan_shards(layouts, max_shard_bytes)
        self.filenames = shard_filenames(len(self.shards))
        self._where = {t.name: (i, t) for i, shard in enumerate(self.shards) for t in shard}
        self._expected_order = [t.name for shard in self.shards for t in shard]
        self._next = 0
        self._shard_index = -1
        self._file: BinaryIO | None = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._expected_order) or self._expected_order[self._next] != name:
            expected = self._expected_order[self._next] if self._next < len(self._expected_order) else "nothing"
            raise RuntimeError(f"writer: got tensor {name!r} but the plan expects {expected!r} next")
        shard_index, layout = self._where[name]
        if tuple(tensor.shape) != layout.shape or tensor.dtype != layout.dtype:
            raise ValueError(f"tensor {name!r}: merged result has shape {tuple(tensor.shape)} {tensor.dtype}, "
                             f"the plan expected {layout.shape} {layout.dtype}")
        if shard_index != self._shard_index:
            self._close_file()
            self._shard_index = shard_index
            self._file = open(self.out_dir / self.filenames[shard_index], "wb")  # noqa: SIM115 - closed by _close_file
            self._file.write(_header(self.shards[shard_index]))
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        assert self._file is not None  # opened above for this shard
        self._file.write(data.numpy().data)
        self._next += 1

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self) -> list[Path]:
        """Close the last shard and write the index; every planned tensor must have arrived."""
        self._close_file()
        if self._next != len(self._expected_order):
            raise RuntimeError(f"writer: only {self._next} of {len(self._expected_order)} tensors were written")
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": sum(t.nbytes for s in self.shards for t in s)},
                     "weight_map": {t.name: self.filenames[i] for i, s in enumerate(self.shards) for t in s}}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return [self.out_dir / f for f in self.filenames]

    def abort(self) -> None:
        self._close_file()
