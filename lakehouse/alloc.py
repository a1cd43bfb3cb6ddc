"""The C allocator's settings while batches are ingested: freed memory is kept for the next batch.

An ingest allocates and frees the same large buffers at every batch: text columns, sealed
columns, the blobs the key store binds, Parquet pages. glibc's ``malloc`` serves a large request
with a fresh ``mmap`` (above its *mmap threshold*) and gives freed memory at the top of a heap
back to the system (above its *trim threshold*); its adaptive thresholds only follow the largest
buffer freed so far, and a batch's columns differ in size from batch to batch. So each batch
touched new pages again: on 1M customers, 300k page faults and over a second of kernel time (a
plain ``write_deltalake`` of the same file: 32k faults, 0.3 s). With the mmap threshold at glibc's
largest (32 MiB on 64-bit) and the trim threshold at 1 GiB, the next batch reuses the pages the
last one freed: 298k -> 214k faults, CPU 5.82 -> 5.58 s, wall 3.41 -> 3.29 s (medians of 6
alternating pairs, #15; the rest of the faults are the Delta writer's own allocator's). The process gives the memory back when the last ingest in it ends (``malloc_trim``), so its
footprint afterwards is what it was.

Only on glibc (Linux); elsewhere :func:`batch_memory` changes nothing. The thresholds stay set for
the rest of the process (glibc cannot return to its adaptive defaults); they are the settings a
data-processing process would choose anyway, and peak memory does not grow with them (1M and 10M
customers: see README's ingest figures).
"""

from __future__ import annotations

import ctypes
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30

_lock = threading.Lock()
_active = 0
_libc: ctypes.CDLL | None = None
_set = False


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None and platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        try:
            lib = ctypes.CDLL(None)
            if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim"):
                _libc = lib
        except OSError:
            pass
    return _libc


def settings() -> dict[str, int] | None:
    """The thresholds this module set in this process, or None (not glibc, or not set yet)."""
    return {"mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD} if _set else None


@contextmanager
def batch_memory() -> Iterator[None]:
    """Keep freed memory in the process while the block runs (see the module docstring). Blocks
    may nest and run in several threads at once: the memory goes back when the last one ends."""
    global _active, _set
    lib = _glibc()
    if lib is None:
        yield
        return
    with _lock:
        if not _set:
            # mallopt returns 1 on success; a refusal leaves glibc's defaults, which only cost time.
            _set = bool(lib.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) & bool(lib.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                lib.malloc_trim(0)
