"""Cheap structural check of a ``.safetensors`` file: header only, no tensor data read.

A safetensors file is ``<u64 little-endian header length N><N bytes of JSON><data>``; the
JSON maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` relative
to the data section (plus an optional ``__metadata__``). A download cut short, a file
overwritten mid-way or a non-safetensors file renamed ``.safetensors`` all break one of the
rules checked here, in microseconds even for a 7 GB checkpoint — so the store can check
every file before use and remove a bad copy, and the message names the file.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from pipelines.errors import ModelRejected

#: Bytes per element of each safetensors dtype.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
#: The reference implementation refuses headers above 100 MB; so do we (and never read more).
MAX_HEADER = 100 * 1000 * 1000


def check_safetensors(path: Path, *, name: str | None = None) -> int:
    """Raise ModelRejected (naming the file) unless ``path`` is a structurally valid safetensors file.

    Checks: the 8-byte length prefix is present and the header fits in the file; the header
    is a JSON object of tensors with known dtypes, shapes and offsets; offsets are in order,
    contiguous from 0, match ``dtype × shape``, and the data section ends exactly at the end
    of the file (a truncated or padded file fails). Returns the number of tensors.
    """
    path = Path(path)
    label = name or path.name

    def bad(why: str) -> ModelRejected:
        return ModelRejected(f"{label}: corrupt or truncated safetensors file ({why})")

    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise bad(f"{size} bytes, shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER:
                raise bad(f"header length {header_len} is beyond the {MAX_HEADER}-byte limit")
            if 8 + header_len > size:
                raise bad(f"header length {header_len} is beyond the file size {size}")
            raw = handle.read(header_len)
    except OSError as exc:
        raise ModelRejected(f"{label}: unreadable ({exc.strerror or exc})") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    spans = []
    for tensor, info in header.items():
        if tensor == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            elements = math.prod(int(d) for d in shape)
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {tensor!r} has no valid dtype/shape/data_offsets") from None
        if dtype not in DTYPE_SIZES:
            raise bad(f"tensor {tensor!r} has unknown dtype {dtype!r}")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
            raise bad(f"tensor {tensor!r} has invalid offsets {begin}..{end}")
        if end - begin != elements * DTYPE_SIZES[dtype]:
            raise bad(f"tensor {tensor!r} spans {end - begin} bytes, {dtype}{list(shape)} needs {elements * DTYPE_SIZES[dtype]}")
        spans.append((begin, end, tensor))
    spans.sort()
    cursor = 0
    for begin, end, tensor in spans:
        if begin != cursor:
            raise bad(f"tensor {tensor!r} starts at {begin}, expected {cursor} (overlap or gap)")
        cursor = end
    data_size = size - 8 - header_len
    if cursor != data_size:
        raise bad(f"tensors need {cursor} data bytes, the file has {data_size}")
    return len(spans)
