"""Giving a memory map's pages back: shared by the GGUF and safetensors readers."""
from __future__ import annotations

import mmap


def release_pages(mm: mmap.mmap, start: int, end: int) -> None:
    """Drops the whole pages inside bytes [start, end) of a read-only map from this process's
    resident memory (they stay in the page cache, and a later read maps them again). A no-op
    where the platform has no MADV_DONTNEED."""
    page = mmap.PAGESIZE
    lo, hi = -(-start // page) * page, end // page * page
    if hi > lo and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
