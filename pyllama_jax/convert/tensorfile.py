"""Tensor files read and written one tensor at a time: safetensors, PyTorch `.pth`/`.bin`, atomic folders.

Readers hand out one array at a time; writers fix every tensor's place
in the file first, then fill it in as tensors arrive, so neither side holds a whole model.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np

SAFETENSORS_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
                      "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64),
                      "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
                      "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_)}
_SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
NUMPY_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                "float16": np.dtype(np.float16)}

Spec = tuple[tuple[int, ...], np.dtype]
ALIGN = 64  # bytes: the alignment XLA's CPU client needs to use a host buffer in place  # shape and dtype of a tensor to be written


def safetensors_header(path: str) -> dict[str, dict[str, Any]]:
    """The tensor entries of a safetensors file (`dtype`, `shape`, `data_offsets`), validated
    against the file's size, so a truncated or damaged file fails here with its name."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"safetensors file not found: {path}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if n is None or 8 + n > size:
            raise ValueError(f"{path}: truncated or not a safetensors file (header does not fit in "
                             f"{size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a safetensors file (unreadable header: {e})") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, info in header.items():
        if info.get("dtype") not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        begin, end = info["data_offsets"]
        if end - begin != math.prod(info["shape"]) * SAFETENSORS_DTYPES[info["dtype"]].itemsize:
            raise ValueError(f"{path}: tensor {name!r} byte range does not match its shape {info['shape']}")
        if end > data_size:
            raise ValueError(f"{path}: truncated file: tensor {name!r} ends at byte {8 + n + end} but the "
                             f"file has {size} bytes")
    return header


def read_safetensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """`(name, array)` pairs of a safetensors file, in file order, each read into its own buffer.

    Plain reads, not a memory map: mapped file pages count in the process's resident memory
    until the map is closed, which would hold a second copy of the model while it loads. Buffers
    are `ALIGN`-byte aligned, so a CPU device can adopt them without a copy (`may_alias`).
    """
    header = safetensors_header(path)
    with open(path, "rb") as f:
        start = 8 + struct.unpack("<Q", f.read(8))[0]
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            raw = np.empty(end - begin + ALIGN, np.uint8)
            raw = raw[-raw.ctypes.data % ALIGN:][:end - begin]
            f.seek(start + begin)
            if f.readinto(memoryview(raw)) != end - begin:
                raise ValueError(f"{path}: truncated file: tensor {name!r} could not be read whole")
            yield name, raw.view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])


class SafetensorsWriter:
    """Writes a safetensors file whose tensors (`specs`) arrive one at a time, in any order."""

    def __init__(self, path: str, specs: Mapping[str, Spec], metadata: Mapping[str, str] | None = None):
        self.path, self.specs, self.pending = path, dict(specs), set(specs)
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        self.offsets: dict[str, int] = {}
        offset = 0
        for name, (shape, dtype) in self.specs.items():
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self.offsets[name] = offset
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment
        self.data_start = 8 + len(raw)
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)
        self.file.truncate(self.data_start + offset)

    def write(self, name: str, array: np.ndarray) -> None:
        if name not in self.specs:
            raise ValueError(f"{self.path}: unexpected tensor {name!r}")
        shape, dtype = self.specs[name]
        if tuple(array.shape) != tuple(shape):
            raise ValueError(f"{self.path}: tensor {name!r} has shape {tuple(array.shape)}, expected {shape}")
        self.file.seek(self.data_start + self.offsets[name])
        np.ascontiguousarray(array, dtype=dtype).tofile(self.file)
        self.pending.discard(name)

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.file.close()
        if exc_type is None and self.pending:
            raise ValueError(f"{self.path}: {len(self.pending)} tensor(s) never written, e.g. "
                             f"{sorted(self.pending)[:3]}")


def load_torch(path: str) -> dict[str, Any]:
    """A PyTorch checkpoint's state dict, memory-mapped: tensors are read only when used."""
    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"PyTorch checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint (truncated or damaged file?): {e}") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict of tensors, found {type(state).__name__}")
    return state


def torch_to_numpy(tensor: Any) -> np.ndarray:
    """A CPU tensor as a numpy array sharing its memory (bfloat16 becomes ml_dtypes.bfloat16)."""
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def numpy_to_torch(array: np.ndarray) -> Any:
    """The inverse of `torch_to_numpy`."""
    import torch

    array = np.ascontiguousarray(array)
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def torch_dtype(dtype: np.dtype) -> Any:
    import torch

    return {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
            np.dtype(ml_dtypes.bfloat16): torch.bfloat16}[np.dtype(dtype)]


@contextlib.contextmanager
def torch_files(specs: Mapping[str, Mapping[str, Spec]]) -> Iterator[dict[str, dict[str, Any]]]:
    """Create PyTorch checkpoints `{path: {name: (shape, dtype)}}` and yield their tensors
    memory-mapped for writing: fill them with `tensor.copy_(...)`, one at a time.

    The files are written with empty storages first (`torch.serialization.skip_data`), then mapped
    shared, so no file's tensors are ever all in memory.
    """
    import mmap

    import torch

    for path, tensors in specs.items():
        with torch.serialization.skip_data():  # untouched pages of torch.empty cost no memory
            torch.save({n: torch.empty(shape, dtype=torch_dtype(dt)) for n, (shape, dt) in tensors.items()}, path)
    with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
        yield {path: torch.load(path, mmap=True, weights_only=True) for path in specs}


@contextlib.contextmanager
def atomic_folder(out: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary folder beside `out`, renamed to `out` when the block succeeds."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another output folder or overwrite it")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(out):
        shutil.rmtree(out)
    os.rename(tmp, out)


def write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"file not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
