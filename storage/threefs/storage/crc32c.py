"""CRC32C (Castagnoli, as 3FS and iSCSI use) of any contiguous buffer, through `google_crc32c`.

`google_crc32c`'s C extension accepts `bytes` only (a memoryview or bytearray is refused) and releases
the GIL only for `bytes` of 1 MiB or more. Reads land in the caller's writable buffer, so for anything
that is not `bytes` this module calls the extension's bundled C library (`crc32c_extend`) through
ctypes, which releases the GIL for every call; where that library cannot be found it falls back to a
copy into `bytes`. Below `COPY_BELOW` bytes a copy into `bytes` plus the extension is cheaper than a
ctypes call (~0.5 us against ~1.9 us for 4 KiB), so small buffers take that path. Every function returns the same value `google_crc32c.value` gives for those bytes.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import google_crc32c
from google_crc32c import _crc32c as _ext


COPY_BELOW = 32 << 10  # smaller non-bytes buffers are copied into bytes (cheaper than a ctypes call)


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The C library inside the google_crc32c wheel (None if this install has none)."""
    package = Path(google_crc32c.__file__).parent
    for path in sorted(package.parent.glob("google_crc32c.libs/libcrc32c*.so*")) + sorted(package.glob("*crc32c*.so*")):
        try:
            lib = ctypes.CDLL(str(path))
            extend = lib.crc32c_extend
        except (OSError, AttributeError):
            continue
        extend.restype = ctypes.c_uint32
        extend.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
        return lib
    return None


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """The CRC32C of `data` (any C-contiguous buffer), extending `crc` (the CRC32C of preceding bytes)."""
    if type(data) is bytes:
        return _ext.extend(crc, data) if crc else _ext.value(data)
    view = memoryview(data).cast("B")
    lib = None if len(view) < COPY_BELOW else _library()
    if lib is None or view.readonly or not len(view):
        return _ext.extend(crc, bytes(view))
    address = ctypes.addressof(ctypes.c_char.from_buffer(view))
    return lib.crc32c_extend(crc, address, len(view))


def crc32c_blocks(data: bytes | bytearray | memoryview, block_size: int) -> list[int]:
    """The CRC32Cs of `data`'s consecutive `block_size` pieces (the last one possibly short)."""
    if type(data) is bytes:
        value = _ext.value
        return [value(data[pos:pos + block_size]) for pos in range(0, len(data), block_size)]
    view = memoryview(data).cast("B")
    lib = None if len(view) < COPY_BELOW else _library()
    if lib is None or view.readonly:
        data = bytes(view)
        return [_ext.value(data[pos:pos + block_size]) for pos in range(0, len(data), block_size)]
    if not len(view):
        return []
    base, extend, size = ctypes.addressof(ctypes.c_char.from_buffer(view)), lib.crc32c_extend, len(view)
    return [extend(0, base + pos, min(block_size, size - pos)) for pos in range(0, size, block_size)]
