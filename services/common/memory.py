"""Give freed heap memory back to the operating system after large, rare allocations.

Loading a model version or reloading the catalogue table builds many short-lived Python
and protobuf objects (100k catalogue items: about 60 MB); once they are freed, glibc's
allocator keeps the pages for reuse, so a process's resident memory stays at its
high-water mark. ``malloc_trim(0)`` returns them (measured: 137 -> 81 MB after a 100k-item
catalogue reload). A no-op where glibc is not the C library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache
from typing import Any


@cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


def trim() -> bool:
    """Return free heap pages to the OS (objects freed by reference counting; no
    garbage collection pass); True when trimmed."""
    lib = _libc()
    if lib is None:
        return False
    lib.malloc_trim(0)
    return True
