"""Streaming, sharded safetensors output.

The plan knows every output tensor's name, shape and dtype before any data is read,
so the shard layout and each shard's header are fixed up front and tensors are then
written one at a time at their offsets: peak memory is one tensor, not one shard.
(safetensors' own ``save_file`` needs the whole shard in memory, hence this writer;
the files it writes are read back with ``safe_open`` in the tests.)

The bytes go out through one page-aligned buffer in large writes, with O_DIRECT where the file
system takes it: the data reaches the disk without a copy into the page cache (on the bench
machine that copy cost as much CPU as a linear merge's arithmetic), and the fsync before the
output's rename (io/output.py) finds nothing left to flush. Where O_DIRECT is refused (EINVAL at
open or at the first write) the same writes are buffered.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..dtypes import SAFETENSORS_CODES

BUFFER_BYTES = 16 << 20  # one write's size
ALIGN = 4096  # O_DIRECT: buffer address, file offset and length multiples of the block size (512 or 4096)


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


class _ShardFile:
    """One output file, written in order through `buffer` (page-aligned, a multiple of ALIGN long)."""

    def __init__(self, path: Path, buffer: mmap.mmap, direct: bool):
        self.path, self.buffer = path, buffer
        self.direct = direct and hasattr(os, "O_DIRECT")
        self.fd = self._open()
        self.fill = 0  # bytes waiting in the buffer
        self.size = 0  # bytes written to the file

    def _open(self) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        if self.direct:
            try:
                return os.open(self.path, flags | os.O_DIRECT, 0o666)
            except OSError as e:
                if e.errno != errno.EINVAL:  # the file system does not do O_DIRECT
                    raise
                self.direct = False
        return os.open(self.path, flags, 0o666)

    def write(self, data: memoryview) -> None:
        done = 0
        while done < len(data):
            n = min(len(data) - done, len(self.buffer) - self.fill)
            self.buffer[self.fill:self.fill + n] = data[done:done + n]
            self.fill += n
            done += n
            if self.fill == len(self.buffer):
                self._flush()

    def _flush(self) -> None:
        """Write the buffer out; a direct write's last block is padded with zeros, cut off again by close."""
        length = -(-self.fill // ALIGN) * ALIGN if self.direct else self.fill
        self.buffer[self.fill:length] = bytes(length - self.fill)
        view = memoryview(self.buffer)[:length]
        try:
            done = 0
            while done < length:
                done += os.pwrite(self.fd, view[done:], self.size + done)
        except OSError as e:  # a file system that opens with O_DIRECT but refuses its writes
            if not (self.direct and e.errno == errno.EINVAL and self.size == 0):
                raise
            os.close(self.fd)
            self.direct = False
            self.fd = self._open()
            self._flush()
            return
        finally:
            view.release()
        self.size += self.fill
        self.fill = 0

    def close(self, complete: bool = True) -> None:
        """Write what is left (not when aborting: the file is thrown away) and close."""
        try:
            if complete and self.fill:
                self._flush()
                os.ftruncate(self.fd, self.size)
        finally:
            os.close(self.fd)


class ShardedSafetensorsWriter:
    """Writes the planned tensors, in plan order, into model-XXXXX-of-YYYYY.safetensors
    files plus model.safetensors.index.json (a single shard is named model.safetensors)."""

    def __init__(self, out_dir: Path, layouts: list[TensorLayout], max_shard_bytes: int, direct: bool = True):
        """direct=False: buffered writes, for files read straight back (they stay in the page cache)."""
        self.out_dir = Path(out_dir)
        self.shards = plan_shards(layouts, max_shard_bytes)
        self.filenames = shard_filenames(len(self.shards))
        self._where = {t.name: (i, t) for i, shard in enumerate(self.shards) for t in shard}
        self._expected_order = [t.name for shard in self.shards for t in shard]
        self._next = 0
        self._shard_index = -1
        self._direct = direct
        self._buffer = mmap.mmap(-1, BUFFER_BYTES)
        self._file: _ShardFile | None = None

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
            self._file = _ShardFile(self.out_dir / self.filenames[shard_index], self._buffer, self._direct)
            self._file.write(memoryview(_header(self.shards[shard_index])))
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        assert self._file is not None  # opened above for this shard
        self._file.write(data.numpy().data)
        self._next += 1

    def _close_file(self, complete: bool = True) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            file.close(complete)

    def finish(self) -> list[Path]:
        """Close the last shard and write the index; every planned tensor must have arrived."""
        try:
            self._close_file()
        finally:
            self._release_buffer()
        if self._next != len(self._expected_order):
            raise RuntimeError(f"writer: only {self._next} of {len(self._expected_order)} tensors were written")
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": sum(t.nbytes for s in self.shards for t in s)},
                     "weight_map": {t.name: self.filenames[i] for i, s in enumerate(self.shards) for t in s}}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return [self.out_dir / f for f in self.filenames]

    def abort(self) -> None:
        self._close_file(complete=False)
        self._release_buffer()

    def _release_buffer(self) -> None:
        """Unmap the write buffer now; after a failed write a traceback may still hold a view of it, and
        then it is unmapped when that goes."""
        with contextlib.suppress(BufferError):
            self._buffer.close()
