"""Reading safetensors headers without reading tensors (standard library only).

A safetensors file is an 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": ...}``
and the tensor bytes. The command line inspects inputs from headers alone, so
names, dtypes and shapes are checked before any tensor is read and before torch
or mergekit is imported.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

#: Bytes per element of each safetensors dtype.
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}
#: Refuse absurd headers before allocating them (safetensors itself caps at 100 MB).
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorHeader:
    """One tensor of a safetensors file, as its header describes it."""

    file: Path
    name: str
    dtype: str
    shape: Tuple[int, ...]
    begin: int  # absolute offset of the first byte in the file
    end: int  # absolute offset one past the last byte

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def read_header(path: Path) -> Dict[str, TensorHeader]:
    """Tensors of one safetensors file; ValueError naming the file if malformed."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, 2)
            handle.seek(0)
            prefix = handle.read(8)
            if len(prefix) != 8:
                raise ValueError("file is shorter than a safetensors header")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"header length {length} is out of range")
            header = json.loads(handle.read(length).decode("utf-8"))
    except OSError as error:
        raise ValueError(f"{path}: cannot read ({error.strerror or error})") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a valid safetensors file ({error})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a valid safetensors file (header is not a map)")
    data_start = 8 + length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
            numel = 1
            for dim in shape:
                numel *= dim
            expected = numel * DTYPE_SIZES[dtype]
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"{path}: tensor {name!r} has a malformed header entry"
            ) from None
        if end - begin != expected or begin < 0 or data_start + end > size:
            raise ValueError(
                f"{path}: tensor {name!r} has data offsets that do not match its "
                f"dtype and shape (file truncated?)"
            )
        tensors[name] = TensorHeader(
            path, name, dtype, shape, data_start + begin, data_start + end
        )
    return tensors


def read_directory(directory: Path) -> Dict[str, TensorHeader]:
    """All tensors of the ``*.safetensors`` files directly in ``directory``.

    A tensor name found in two files is an error (the model would be ambiguous).
    """
    directory = Path(directory)
    tensors: Dict[str, TensorHeader] = {}
    for path in sorted(directory.glob("*.safetensors")):
        for name, info in read_header(path).items():
            if name in tensors:
                raise ValueError(
                    f"{directory}: tensor {name!r} is in both "
                    f"{tensors[name].file.name} and {path.name}"
                )
            tensors[name] = info
    return tensors
