"""Lazy access to a model directory's tensors.

Safetensors headers are read once per file (checked by ``safe_open``); a tensor is
read only when asked for, with one positioned read straight into a new tensor
(``readinto``: no mmap, so no page of the file stays mapped and counted in the
process's RSS, and the copy happens on the thread that asks, without holding the
GIL: the executor's reader thread, not the arithmetic). Memory follows the largest
tensor, not the model. Pickled ``.bin`` checkpoints are refused unless the caller opts
in, and even then are read with torch's ``weights_only`` unpickler.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from safetensors import safe_open

from ..dtypes import BY_NAME, FROM_SAFETENSORS_CODE, dtype_name
from ..errors import ModelLoadError

if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer from Python 3.12

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def resolve_model_path(model: str) -> Path:
    """A local directory, or the hub snapshot of a hub id (see io/hub.py); LoRA references need
    io.references.open_model."""
    from ..reference import parse_reference
    from .hub import resolve_model_dir

    if Path(model).expanduser().is_dir():
        return Path(model).expanduser()
    try:
        ref = parse_reference(model)
    except ValueError as e:
        raise ModelLoadError(str(e)) from None
    if ref.lora is not None:
        raise ModelLoadError(f"model {model!r} is a base+LoRA reference; open it with "
                             "merge_engine.io.references.open_model")
    return resolve_model_dir(ref.model)


class ModelSource:
    """One input model directory: its config and a name -> tensor view of its weights."""

    def __init__(self, model: str, *, allow_pickle: bool = False, cache: bool = False,
                 path: Path | None = None):
        self.name = model
        self.path = Path(path) if path is not None else resolve_model_path(model)
        self.config = self._read_config()
        self._cache: dict[str, torch.Tensor] | None = {} if cache else None
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        self._spans: dict[str, tuple[int, int]] = {}  # safetensors tensor -> [start, end) bytes in its file
        self._pickled: dict[str, dict[str, torch.Tensor]] = {}
        self.allow_pickle = allow_pickle
        self.weight_map = self._read_weight_map(allow_pickle)

    def _read_config(self) -> dict:
        path = self.path / "config.json"
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelLoadError(f"model {self.name!r}: no config.json in {self.path}") from None
        except (ValueError, OSError) as e:  # JSONDecodeError, UnicodeDecodeError, a directory, no permission
            raise ModelLoadError(f"model {self.name!r}: {path} is not a readable JSON file: {e}") from None
        if not isinstance(config, dict):
            raise ModelLoadError(f"model {self.name!r}: {path} holds a JSON {type(config).__name__}, not an "
                                 "object of model settings; restore the model's original config.json")
        return config

    def _read_weight_map(self, allow_pickle: bool) -> dict[str, str]:
        if (self.path / SAFE_INDEX).exists():
            return self._index(SAFE_INDEX)
        if (self.path / SAFE_SINGLE).exists():
            self._check_inside(SAFE_SINGLE, "the model directory")
            return {n: SAFE_SINGLE for n in self._read_header(SAFE_SINGLE)}
        singles = sorted(p.name for p in self.path.glob("*.safetensors"))
        if singles:
            for f in singles:
                self._check_inside(f, "the model directory")
            return {n: f for f in singles for n in self._read_header(f)}
        pickled = PICKLE_INDEX if (self.path / PICKLE_INDEX).exists() else (
            PICKLE_SINGLE if (self.path / PICKLE_SINGLE).exists() else None)
        if pickled is None:
            raise ModelLoadError(f"model {self.name!r}: no weights found in {self.path} "
                                 "(expected model.safetensors or model.safetensors.index.json)")
        if not allow_pickle:
            raise ModelLoadError(
                f"model {self.name!r}: weights are a pickle ({pickled}); pickles can run arbitrary code, so "
                "they are not loaded by default. Convert the model to safetensors, or pass --allow-pickle "
                "(read with torch's weights_only unpickler) if you trust this file.")
        if pickled == PICKLE_INDEX:
            return self._index(PICKLE_INDEX)
        return {n: PICKLE_SINGLE for n in self._load_pickle(PICKLE_SINGLE)}

    def _index(self, index_name: str) -> dict[str, str]:
        """The index's weight_map, every file checked: inside the model directory, present, and a
        pickle only with allow_pickle."""
        path = self.path / index_name
        self._check_inside(index_name, "the model directory")
        try:
            index = json.loads(path.read_text())
        except (ValueError, OSError) as e:
            raise ModelLoadError(f"model {self.name!r}: {path} is not a readable JSON file: {e}") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise ModelLoadError(f"model {self.name!r}: {path} needs a \"weight_map\" object of tensor name -> "
                                 "file name (strings); re-save the model or fix the index")
        for filename in sorted(set(weight_map.values())):
            self._check_inside(filename, str(path))
            if filename.endswith(PICKLE_SUFFIXES):
                if not self.allow_pickle:
                    raise ModelLoadError(
                        f"model {self.name!r}: {path} names the pickle {filename}; pickles can run arbitrary "
                        "code, so they are not loaded by default. Convert it to safetensors, or pass "
                        "--allow-pickle if you trust it")
            elif not filename.endswith(".safetensors"):
                raise ModelLoadError(f"model {self.name!r}: {path} names {filename!r}, which is neither a "
                                     ".safetensors file nor a pickle (.bin); fix the index")
            if not (self.path / filename).is_file():
                raise ModelLoadError(f"model {self.name!r}: {path} names {filename}, which is missing from "
                                     f"{self.path}; download it again")
        return dict(weight_map)

    def _check_inside(self, filename: str, named_by: str) -> None:
        """A weight file named by an index (or found in the directory) must lie inside the model
        directory: no absolute paths, no `..`, no symlink out of it (except a Hugging Face cache
        snapshot's links into its repository's blobs/)."""
        rel = Path(filename)
        if rel.is_absolute() or ".." in rel.parts:
            raise ModelLoadError(f"model {self.name!r}: {named_by} names {filename!r}, outside the model "
                                 "directory; weight files must be inside it")
        real = (self.path / rel).resolve()
        roots = [self.path.resolve()]
        if self.path.parent.name == "snapshots":  # huggingface_hub cache: snapshots/<rev>/f -> ../../blobs/<hash>
            roots.append(self.path.parent.parent.resolve() / "blobs")
        if not any(real.is_relative_to(r) for r in roots):
            raise ModelLoadError(f"model {self.name!r}: {self.path / rel} is a symlink to {real}, outside the "
                                 "model directory; copy the file into the model directory instead")

    def _open(self, filename: str):
        path = self.path / filename
        try:
            return safe_open(str(path), framework="pt")
        except FileNotFoundError:
            raise ModelLoadError(f"model {self.name!r}: {path} is listed in the index but missing") from None
        except Exception as e:  # noqa: BLE001 - header or size corruption
            raise ModelLoadError(f"model {self.name!r}: {path} is not a readable safetensors file "
                                 f"(truncated or corrupt?): {e}") from None

    def _read_header(self, filename: str) -> list[str]:
        """Names, shapes and dtypes of one file's tensors (header only)."""
        with self._open(filename) as f:
            names = list(f.keys())
            for n in names:
                sl = f.get_slice(n)
                self._meta[n] = (tuple(sl.get_shape()), _dtype_name(sl.get_dtype()))
        self._spans.update(_data_spans(self.path / filename))
        return names

    def _load_pickle(self, filename: str) -> dict[str, torch.Tensor]:
        if filename not in self._pickled:
            path = self.path / filename
            if not self.allow_pickle:  # every pickle read goes through here
                raise ModelLoadError(f"model {self.name!r}: {path} is a pickle; pass --allow-pickle if you "
                                     "trust it, or convert it to safetensors")
            try:
                self._pickled[filename] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - any unpickling failure is reported the same way
                raise ModelLoadError(f"model {self.name!r}: refused to load {path}: {e}") from None
        return self._pickled[filename]

    def tensor_names(self) -> list[str]:
        return list(self.weight_map)

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def meta(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, dtype name) without reading the data."""
        filename = self._file_for(name)
        if filename.endswith(".safetensors"):
            if name not in self._meta:
                self._read_header(filename)
            return self._meta[name]
        t = self._load_pickle(filename)[name]
        return tuple(t.shape), dtype_name(t.dtype)

    def get(self, name: str) -> torch.Tensor:
        if self._cache is not None and name in self._cache:
            return self._cache[name]
        filename = self._file_for(name)
        if filename.endswith(".safetensors"):
            tensor = self._read_safetensors(filename, name)
        else:
            tensor = self._load_pickle(filename)[name]
        if self._cache is not None:
            self._cache[name] = tensor
        return tensor

    def _read_safetensors(self, filename: str, name: str) -> torch.Tensor:
        if name not in self._spans:
            self._read_header(filename)
        shape, dtype = self._meta[name]
        torch_dtype = BY_NAME.get(dtype)
        path = self.path / filename
        try:
            if torch_dtype is None or sys.byteorder != "little":  # let safetensors convert what we cannot
                with self._open(filename) as f:
                    return f.get_tensor(name)
            tensor = torch.empty(shape, dtype=torch_dtype)
            start, end = self._spans[name]
            buffer = memoryview(cast("Buffer", tensor.reshape(-1).view(torch.uint8).numpy()))
            if len(buffer) != end - start:
                raise ValueError(f"header says {end - start} bytes for shape {list(shape)} {dtype}")
            with open(path, "rb", buffering=0) as f:
                f.seek(start)
                done = 0
                while done < len(buffer):
                    got = f.readinto(buffer[done:])
                    if not got:
                        raise ValueError(f"the file ends {len(buffer) - done} bytes early")
                    done += got
            return tensor
        except Exception as e:  # noqa: BLE001 - any read failure names the tensor and file
            raise ModelLoadError(f"model {self.name!r}: cannot read tensor {name!r} from {path} "
                                 f"(truncated or corrupt?): {e}") from None

    def _file_for(self, name: str) -> str:
        try:
            return self.weight_map[name]
        except KeyError:
            raise ModelLoadError(f"model {self.name!r} has no tensor {name!r}") from None


def _data_spans(path: Path) -> dict[str, tuple[int, int]]:
    """Each tensor's [start, end) byte range in a safetensors file (whose header safe_open accepted)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return {n: (8 + length + v["data_offsets"][0], 8 + length + v["data_offsets"][1])
            for n, v in header.items() if n != "__metadata__"}


def _dtype_name(code: str) -> str:
    """'bfloat16' for a safetensors 'BF16'; an unknown code is kept as it is."""
    dtype = FROM_SAFETENSORS_CODE.get(code)
    return dtype_name(dtype) if dtype is not None else code
