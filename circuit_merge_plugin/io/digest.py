"""``circuit-merge digest DIR``: an order-independent SHA-256 of a model's tensors.

The digest depends only on the tensors themselves (names, dtypes, shapes and
bytes), never on how they are split into shard files, their order inside a file,
file names, file metadata or anything else in the directory. So two merges with
the same inputs, parameters and seed give the same digest on any machine, which
makes it a regression check for CI.

Definition (version 1): for every tensor, ``h = SHA-256(len(name) as 8-byte
little-endian || name in UTF-8 || dtype || NUL || shape as comma-separated
decimals || NUL || raw tensor bytes)``, where dtype is the safetensors code
(``F32``, ``BF16``, ...). The digest is ``SHA-256("circuit-merge digest v1" NUL
|| h_1 || ... || h_n)`` with tensors sorted by the UTF-8 bytes of their names.
Standard library only: no torch import, bounded memory (1 MiB reads).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict

from circuit_merge_plugin.io.headers import TensorHeader, read_directory

DIGEST_TAG = b"circuit-merge digest v1\0"
_READ = 1 << 20


#: Safetensors dtype code of each torch dtype (by ``str(dtype)``: no torch import here).
TORCH_DTYPE_CODES = {
    "torch.float64": "F64",
    "torch.float32": "F32",
    "torch.float16": "F16",
    "torch.bfloat16": "BF16",
    "torch.float8_e4m3fn": "F8_E4M3",
    "torch.float8_e5m2": "F8_E5M2",
    "torch.int64": "I64",
    "torch.int32": "I32",
    "torch.int16": "I16",
    "torch.int8": "I8",
    "torch.uint8": "U8",
    "torch.bool": "BOOL",
}


def record_hash(name: str, dtype: str, shape):
    """A SHA-256 of a tensor record's header; update it with the raw bytes, then digest."""
    encoded = name.encode("utf-8")
    record = hashlib.sha256()
    record.update(len(encoded).to_bytes(8, "little"))
    record.update(encoded)
    record.update(dtype.encode("ascii") + b"\0")
    record.update(",".join(str(d) for d in shape).encode("ascii") + b"\0")
    return record


def tensor_digest(info: TensorHeader, handle) -> bytes:
    """SHA-256 of one tensor record, reading its bytes from the open file."""
    record = record_hash(info.name, info.dtype, info.shape)
    handle.seek(info.begin)
    remaining = info.end - info.begin
    while remaining:
        block = handle.read(min(_READ, remaining))
        if not block:
            raise ValueError(f"{info.file}: truncated data of tensor {info.name!r}")
        record.update(block)
        remaining -= len(block)
    return record.digest()


def tensor_digests(directory: Path) -> Dict[str, str]:
    """Hex digest of every tensor of the ``*.safetensors`` files in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory}: not a directory")
    tensors = read_directory(directory)
    if not tensors:
        raise ValueError(f"{directory}: no safetensors tensors found")
    digests = {}
    by_file: Dict[Path, list] = {}
    for info in tensors.values():
        by_file.setdefault(info.file, []).append(info)
    for path, infos in by_file.items():
        with open(path, "rb") as handle:
            for info in sorted(infos, key=lambda i: i.begin):
                digests[info.name] = tensor_digest(info, handle).hex()
    return digests


def combine(digests: Dict[str, str]) -> str:
    total = hashlib.sha256(DIGEST_TAG)
    for name in sorted(digests, key=lambda n: n.encode("utf-8")):
        total.update(bytes.fromhex(digests[name]))
    return total.hexdigest()


def digest_directory(directory: Path) -> str:
    """The order-independent digest of a model directory (hex)."""
    return combine(tensor_digests(directory))
