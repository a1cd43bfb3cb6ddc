"""Memory settings while batches are ingested: freed memory is kept for the next batch, and no
transparent huge pages are made.

An ingest allocates and frees the same large buffers at every batch: text columns, sealed
columns, the blobs the key store binds, Parquet pages. Two things made each batch pay the kernel
for fresh pages again (1M customers: 300k page faults and over a second of kernel time, where a
plain ``write_deltalake`` of the same file takes 32k faults and 0.3 s):

* glibc's ``malloc`` serves a large request with a fresh ``mmap`` (above its *mmap threshold*) and
  gives freed memory at the top of a heap back to the system (above its *trim threshold*); its
  adaptive thresholds only follow the largest buffer freed so far, and a batch's columns differ in
  size from batch to batch. With the mmap threshold at glibc's largest (32 MiB on 64-bit) and the
  trim threshold at 1 GiB, the next batch reuses the pages the last one freed: 298k -> 214k
  faults, CPU 5.82 -> 5.58 s, wall 3.41 -> 3.29 s (medians of 6 alternating pairs, #15).
* Arrow's allocator (mimalloc) asks for huge pages and returns freed memory to the system after
  10 ms; each time a region is touched again the kernel zeroes a whole 2 MiB page, however little
  of it is used (clear_page: a tenth of the ingest's CPU). With transparent huge pages off for the
  process while it ingests (``PR_SET_THP_DISABLE``), only the 4 KiB pages touched are zeroed:
  more faults (about 290k) but less kernel time. In four sets of 5-6 alternating pairs the median
  wall time moved by -0.26, -0.16, -0.18 and -0.01 s, CPU by -0.33, -0.03, -0.12 and -0.04 s
  (#15): about 0.12 s of 3.3.

The process gives the memory back when the last ingest in it ends (``malloc_trim``), so its
footprint afterwards is what it was, and huge pages are allowed again if they were before.

Only on glibc (Linux); elsewhere :func:`batch_memory` changes nothing. The malloc thresholds stay
set for the rest of the process (glibc cannot return to its adaptive defaults); they are the
settings a data-processing process would choose anyway, and peak memory does not grow with them
(1M and 10M customers: see README's ingest figures).
"""

from __future__ import annotations

import ctypes
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_THRESHOLD = -3
_PR_SET_THP_DISABLE = 41  # <linux/prctl.h>
_PR_GET_THP_DISABLE = 42
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30

_lock = threading.Lock()
_active = 0
_libc: ctypes.CDLL | None = None
_set = False
_restore_thp = False  # while blocks run: huge pages were allowed before the first, and this turned them off


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None and platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        try:
            lib = ctypes.CDLL(None)
            if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") and hasattr(lib, "prctl"):
                _libc = lib
        except OSError:
            pass
    return _libc


def settings() -> dict[str, int] | None:
    """The thresholds this module set in this process, or None (not glibc, or not set yet)."""
    return {"mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD} if _set else None


def huge_pages_disabled() -> bool | None:
    """Whether transparent huge pages are off for this process (None: not known here)."""
    lib = _glibc()
    if lib is None:
        return None
    got = lib.prctl(_PR_GET_THP_DISABLE, 0, 0, 0, 0)
    return None if got < 0 else bool(got)


@contextmanager
def batch_memory() -> Iterator[None]:
    """Keep freed memory in the process and make no huge pages while the block runs (see the
    module docstring). Blocks may nest and run in several threads at once: the memory goes back,
    and huge pages are allowed again, when the last one ends."""
    global _active, _set, _restore_thp
    lib = _glibc()
    if lib is None:
        yield
        return
    with _lock:
        if not _set:
            # mallopt returns 1 on success; a refusal leaves glibc's defaults, which only cost time.
            _set = bool(lib.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) & bool(lib.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        if _active == 0:
            # A kernel without the call (< 3.15) answers -1: nothing to change, nothing to restore.
            _restore_thp = lib.prctl(_PR_GET_THP_DISABLE, 0, 0, 0, 0) == 0 and lib.prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                if _restore_thp:
                    lib.prctl(_PR_SET_THP_DISABLE, 0, 0, 0, 0)
                _restore_thp = False
                lib.malloc_trim(0)
