"""The safetensors file format, read and written with NumPy (bf16 and FP8 included, via ml_dtypes).

A file is an 8-byte little-endian header length, a JSON header ``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}`` padded with spaces to 8 bytes, then the raw
little-endian tensor bytes. The ``safetensors`` package's NumPy reader cannot return FP8 tensors, which
DeepSeek-V3's release stores, so the converter reads the format itself; files written here load with
the official library.
"""

from __future__ import annotations

import json
import pathlib
import struct

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
CODES = {np.dtype(dtype): code for code, dtype in DTYPES.items()}


def read_header(path: str | pathlib.Path) -> tuple[dict, int]:
    """(the JSON header without ``__metadata__``, the byte offset where tensor data starts)."""
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def read_file(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor of one file, memory-mapped (read-only) in its stored dtype."""
    header, start = read_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = {}
    for name, entry in header.items():
        if entry["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, which is not supported")
        begin, end = entry["data_offsets"]
        dtype = np.dtype(DTYPES[entry["dtype"]]).newbyteorder("<")
        tensors[name] = data[start + begin:start + end].view(dtype).reshape(entry["shape"])
    return tensors


def write_file(path: str | pathlib.Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes ``tensors`` (C-contiguous copies, little-endian) to ``path`` atomically (temp file + rename)."""
    header, offset, blobs = {}, 0, []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        if array.dtype not in CODES:
            raise ValueError(f"tensors[{name!r}]: dtype {array.dtype} cannot be stored in safetensors")
        blob = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": CODES[array.dtype], "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    path = pathlib.Path(path)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for blob in blobs:
            file.write(blob)
    partial.replace(path)
