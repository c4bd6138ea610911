"""Bounds checks on a GGUF header before anything is parsed into memory.

gguf's reader trusts the header: a count of 2^40 array items past the end of the file makes it loop for ever, and
a tensor declaring 2^40 elements would be dequantised into a buffer the file cannot justify. This walks the header
with every count, length, dimension and offset checked against the bytes the file actually has, so a damaged or
hostile file is a one-line ``ModelLoadError`` before any large allocation. The checks follow the GGUF spec
(versions 2 and 3, either byte order): at most 4 dimensions, rows that fill whole quantisation blocks, a
power-of-two ``general.alignment``, tensor data inside the file.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from ..errors import ModelLoadError

MAX_DIMS = 4  # GGML_MAX_DIMS
_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_FIX = "the file is truncated or not a GGUF; download or export it again"


class _Bad(Exception):
    pass


class _Cursor:
    def __init__(self, data, order: str):
        self.data, self.order, self.pos, self.size = data, order, 0, len(data)

    def left(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> int:
        if n < 0 or n > self.left():
            raise _Bad(f"{what} needs {n} bytes at offset {self.pos}, but the file ends {self.left()} bytes later")
        start, self.pos = self.pos, self.pos + n
        return start

    def uint(self, width: int, what: str) -> int:
        start = self.take(width, what)
        return struct.unpack_from(self.order + {4: "I", 8: "Q"}[width], self.data, start)[0]

    def string(self, what: str) -> bytes:
        length = self.uint(8, f"the length of {what}")
        return bytes(self.data[self.take(length, what):self.pos])


def _skip_value(cur: _Cursor, kind: int, what: str, depth: int = 0) -> int | None:
    """Skip one metadata value of GGUFValueType ``kind``; returns a u32 scalar's value (for the alignment)."""
    if kind in _SCALARS:
        start = cur.take(_SCALARS[kind], what)
        return struct.unpack_from(cur.order + "I", cur.data, start)[0] if kind == _UINT32 else None
    if kind == _STRING:
        cur.string(what)
        return None
    if kind == _ARRAY:
        if depth > 2:
            raise _Bad(f"{what}: arrays nested too deep")
        item = cur.uint(4, f"the item type of {what}")
        count = cur.uint(8, f"the item count of {what}")
        if item in _SCALARS:
            cur.take(count * _SCALARS[item], f"{what} ({count} items)")
            return None
        smallest = {_STRING: 8, _ARRAY: 12}.get(item)
        if smallest is None:
            raise _Bad(f"{what}: unknown array item type {item}")
        if count * smallest > cur.left():
            raise _Bad(f"{what} declares {count} items, more than the {cur.left()} bytes left in the file")
        if item == _STRING:  # the tokenizer's vocabulary and merges: ~100k strings, so a tight loop
            pos, size, data, unpack = cur.pos, cur.size, cur.data, struct.Struct(cur.order + "Q").unpack_from
            for index in range(count):
                if pos + 8 > size or pos + 8 + unpack(data, pos)[0] > size:
                    cur.pos = pos
                    raise _Bad(f"{what}: item {index} of {count} runs past the end of the file")
                pos += 8 + unpack(data, pos)[0]
            cur.pos = pos
            return None
        for _ in range(count):
            _skip_value(cur, item, what, depth + 1)
        return None
    raise _Bad(f"{what}: unknown value type {kind}")


def check_gguf_layout(path: str | Path) -> None:
    """Raise ``ModelLoadError`` naming ``path`` unless every count, length, dimension and tensor extent of its
    header fits inside the file."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, 2)
            if size < 24:
                raise _Bad(f"only {size} bytes: too short for a GGUF header")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                _check(data)
    except _Bad as problem:
        raise ModelLoadError(f"cannot read GGUF: damaged header: {problem}", where=str(path), fix=_FIX) from None
    except OSError as error:
        raise ModelLoadError(f"cannot read the file ({error.strerror or error})", where=str(path),
                             fix="check that the file exists and is readable") from None


def _check(data) -> None:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    if bytes(data[:4]) != b"GGUF":
        raise _Bad("no GGUF magic at the start")
    order = "<"
    version = struct.unpack_from("<I", data, 4)[0]
    if version & 0xFFFF == 0:  # written on a big-endian machine
        order, version = ">", struct.unpack_from(">I", data, 4)[0]
    if version not in (2, 3):
        raise _Bad(f"GGUF version {version} (supported: 2, 3)")
    cur = _Cursor(data, order)
    cur.pos = 8
    n_tensors = cur.uint(8, "the tensor count")
    n_kv = cur.uint(8, "the metadata count")
    if n_kv * 13 > cur.left():  # the smallest entry: an 8-byte key length, 4-byte type, 1-byte value
        raise _Bad(f"{n_kv} metadata entries cannot fit in the {cur.left()} bytes left")
    alignment = 32
    for index in range(n_kv):
        key = cur.string(f"metadata key #{index}")
        name = key.decode("utf-8", errors="replace")[:80]
        kind = cur.uint(4, f"the type of {name!r}")
        value = _skip_value(cur, kind, f"metadata {name!r}")
        if key == b"general.alignment" and kind == _UINT32:
            alignment = value
    if not alignment or alignment & (alignment - 1):
        raise _Bad(f"general.alignment {alignment} is not a power of two")
    if n_tensors * 24 > cur.left():  # the smallest tensor entry: name length, dim count, type, offset
        raise _Bad(f"{n_tensors} tensors cannot fit in the {cur.left()} bytes left")
    tensors = []
    for index in range(n_tensors):
        name = cur.string(f"tensor name #{index}").decode("utf-8", errors="replace")[:80]
        n_dims = cur.uint(4, f"the dimension count of tensor {name!r}")
        if n_dims > MAX_DIMS:
            raise _Bad(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
        dims = [cur.uint(8, f"a dimension of tensor {name!r}") for _ in range(n_dims)]
        raw_type = cur.uint(4, f"the type of tensor {name!r}")
        offset = cur.uint(8, f"the data offset of tensor {name!r}")
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(raw_type)]
        except (ValueError, KeyError):
            raise _Bad(f"tensor {name!r} has unknown type {raw_type}") from None
        elements = 1
        for dim in dims:
            elements *= dim
        if dims and dims[0] % block:
            raise _Bad(f"tensor {name!r}: rows of {dims[0]} do not fill blocks of {block}")
        tensors.append((name, elements, elements // block * type_size, offset))
    data_start = -(-cur.pos // alignment) * alignment
    for name, elements, n_bytes, offset in tensors:
        if data_start + offset + n_bytes > cur.size:
            raise _Bad(f"tensor {name!r} declares {elements} elements ({n_bytes} bytes at offset {offset}), "
                       f"but the file holds only {max(0, cur.size - data_start)} bytes of tensor data")
