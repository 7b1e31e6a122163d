"""services/common/memory.trim gives freed heap pages back: measured on this process."""

from __future__ import annotations

import re
from pathlib import Path

from services.common.memory import trim


def _anon_kb() -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"RssAnon:\s+(\d+)", text).group(1))  # type: ignore[union-attr]


def test_trim_returns_freed_heap_pages_to_the_os() -> None:
    """Many heap blocks (larger than Python's small-object arenas, as parsed catalogue
    items and JSON tables are), most of them freed while a few stay alive in between:
    glibc keeps the free pages until trim() gives them back."""
    trim()
    base = _anon_kb()
    blocks = [bytes(2000) + str(i).encode() for i in range(60_000)]  # ~120 MB
    grown = _anon_kb()
    assert grown - base > 80 * 1024, (base, grown)
    keep = blocks[::64]  # a block every 64: the heap cannot shrink from its top
    blocks.clear()
    freed = _anon_kb()
    assert trim()
    trimmed = _anon_kb()
    assert freed - trimmed > 60 * 1024, (base, grown, freed, trimmed)
    assert len(keep) == 938
