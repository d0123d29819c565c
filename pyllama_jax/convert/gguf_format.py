"""GGUF's container, read directly: header, metadata, tensor table and (dequantized) tensor data.

Written from the format's specification (ggml's docs/gguf.md): little-endian, version 2 or 3. Metadata
is parsed from one read of the file's head (the `gguf` package's reader builds a numpy view per value,
about 5 s for a 49k-token vocabulary); tensor data stays memory-mapped. F32/F16/BF16/Q4_0/Q4_1/Q8_0 are
dequantized here a whole tensor at a time, other block types by the `gguf` package.
"""
from __future__ import annotations

import dataclasses
import os
import struct
from typing import Any

import numpy as np

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# ggml type id -> (name, elements per block, bytes per block) for the types dequantized here
_BLOCKS = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 8: ("Q8_0", 32, 34),
           30: ("BF16", 1, 2)}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table: `shape` in ggml's order (innermost dimension first)."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int  # bytes from the start of the data section

    @property
    def type_name(self) -> str:
        if self.type_id in _BLOCKS:
            return _BLOCKS[self.type_id][0]
        from gguf.constants import GGMLQuantizationType

        try:
            return GGMLQuantizationType(self.type_id).name
        except ValueError:
            return f"type {self.type_id}"

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def n_bytes(self) -> int:
        block, size = _block_size(self.type_id)
        if self.shape and self.shape[0] % block:
            raise ValueError(f"tensor {self.name!r}: rows of {self.shape[0]} are not whole {self.type_name} "
                             f"blocks of {block}")
        return self.n_elements // block * size


def _block_size(type_id: int) -> tuple[int, int]:
    if type_id in _BLOCKS:
        return _BLOCKS[type_id][1:]
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        raise ValueError(f"unknown ggml tensor type {type_id}") from None


class _Cursor:
    """Reads GGUF values from a byte buffer; a read past its end raises EOFError."""

    def __init__(self, buf: bytes):
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise EOFError
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise EOFError
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, n = self.unpack("<I"), self.unpack("<Q")
            if item in _SCALARS:  # numbers: one frombuffer for the whole array
                dtype = np.dtype(_SCALARS[item])
                if self.pos + n * dtype.itemsize > len(self.buf):
                    raise EOFError
                values = np.frombuffer(self.buf, dtype, n, self.pos)
                self.pos += n * dtype.itemsize
                return values.tolist()
            return [self.value(item) for _ in range(n)]
        raise ValueError(f"unknown metadata value type {kind}")


class GGUFContainer:
    """A GGUF file's metadata (`fields`: key -> Python value) and tensor table (`tensors`, in file order)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        size = os.path.getsize(self.path)
        head = 1 << 20
        while True:  # metadata sits at the head of the file: read more until it parses
            with open(self.path, "rb") as f:
                buf = f.read(min(head, size))
            try:
                self._parse(buf)
                break
            except EOFError:
                if head >= size:
                    raise ValueError(f"{self.path}: truncated GGUF header") from None
                head *= 4
        for t in self.tensors:
            try:
                end = self.data_start + t.offset + t.n_bytes()
            except ValueError as e:
                raise ValueError(f"{self.path}: {e}") from None
            if end > size:
                raise ValueError(f"{self.path}: tensor {t.name!r} ends at byte {end}, past the file's {size}")

    def _parse(self, buf: bytes) -> None:
        c = _Cursor(buf)
        if buf[:4] != MAGIC:
            raise ValueError(f"{self.path}: not a GGUF file (magic {buf[:4]!r}, expected {MAGIC!r})")
        c.pos = 4
        self.version = c.unpack("<I")
        if self.version not in (2, 3):
            swapped = struct.unpack(">I", struct.pack("<I", self.version))[0]
            what = "a big-endian GGUF file" if swapped in (2, 3) else f"GGUF version {self.version}"
            raise ValueError(f"{self.path}: {what} is not supported (little-endian version 2 or 3 is)")
        n_tensors, n_fields = c.unpack("<Q"), c.unpack("<Q")
        self.fields: dict[str, Any] = {}
        for _ in range(n_fields):
            key = c.string()
            self.fields[key] = c.value(c.unpack("<I"))
        self.tensors: list[TensorInfo] = []
        for _ in range(n_tensors):
            name = c.string()
            shape = tuple(c.unpack("<Q") for _ in range(c.unpack("<I")))
            self.tensors.append(TensorInfo(name, shape, c.unpack("<I"), c.unpack("<Q")))
        align = int(self.fields.get("general.alignment", DEFAULT_ALIGNMENT))
        self.data_start = -(-c.pos // align) * align

    def raw(self, t: TensorInfo) -> np.ndarray:
        """The tensor's bytes, memory-mapped (uint8)."""
        return np.memmap(self.path, np.uint8, "r", self.data_start + t.offset, (t.n_bytes(),))

    def tensor(self, t: TensorInfo) -> np.ndarray:
        """The tensor dequantized to float32, in PyTorch's order (outermost dimension first)."""
        shape = tuple(reversed(t.shape))
        return dequantize(self.raw(t), t.type_id).reshape(shape)


def dequantize(raw: np.ndarray, type_id: int) -> np.ndarray:
    """Flat float32 values of ggml-typed bytes (same float32 arithmetic as ggml's reference)."""
    if type_id == 0:
        return raw.view(np.float32)
    if type_id == 1:
        return raw.view(np.float16).astype(np.float32)
    if type_id == 30:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if type_id in _BLOCKS:
        _, _, size = _BLOCKS[type_id]
        blocks = raw.reshape(-1, size)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        if type_id == 8:  # Q8_0: d * q
            return (blocks[:, 2:].view(np.int8).astype(np.float32) * d).reshape(-1)
        qs = blocks[:, size - 16:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1)  # elements 0-15 in the low nibbles, 16-31 high
        if type_id == 2:  # Q4_0: d * (q - 8)
            return ((q.astype(np.int8) - np.int8(8)).astype(np.float32) * d).reshape(-1)
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)  # Q4_1: d * q + m
        return (d * q.astype(np.float32) + m).reshape(-1)
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    return gguf_dequantize(np.asarray(raw), GGMLQuantizationType(type_id)).astype(np.float32, copy=False).reshape(-1)
