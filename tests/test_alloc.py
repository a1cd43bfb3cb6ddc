"""lakehouse.alloc: freed memory is kept for the next batch while an ingest runs, no transparent
huge page is made, and both are undone when the last one ends (#15)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lakehouse import alloc

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
ROOT = Path(__file__).parents[1]

# A fresh process: a buffer a little larger at each round (as a batch's columns differ in size from
# batch to batch) allocated, written and freed eight times, outside and then inside batch_memory,
# counting the page faults of each round; then the resident size before and after the block ends.
_PROBE = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from lakehouse import alloc

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

def rounds(first):
    out = []
    for i in range(first, first + 8):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        held = bytes([65 + i]) * ((24 << 20) + i * (256 << 10))
        del held
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return out

before = rounds(0)
thp = [alloc.huge_pages_disabled()]
with alloc.batch_memory():
    thp.append(alloc.huge_pages_disabled())
    inside = rounds(8)
    held = [bytes(1 << 20) for _ in range(64)]  # 64 MiB, freed inside the block
    del held
    kept = rss()
after = rss()
thp.append(alloc.huge_pages_disabled())
print(json.dumps({"before": before, "inside": inside, "kept": kept, "after": after, "settings": alloc.settings(), "thp": thp}))
"""


@pytest.mark.skipif(not GLIBC, reason="glibc only: elsewhere batch_memory changes nothing")
def test_inside_batch_memory_a_freed_buffer_is_reused_no_huge_page_is_made_and_all_is_undone_at_the_end():
    out = subprocess.run([sys.executable, "-c", _PROBE, str(ROOT)], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    pages = (24 << 20) // 4096
    # glibc's defaults: a buffer larger than any freed so far is a fresh mapping, every page faulted
    assert min(got["before"]) > pages * 0.9, got["before"]
    # inside: the memory the last round freed serves the next; only its growth is new
    assert max(got["inside"][1:]) < pages * 0.05, got["inside"]
    assert got["settings"] == {"mmap_threshold": alloc.MMAP_THRESHOLD, "trim_threshold": alloc.TRIM_THRESHOLD}
    # what was kept inside is given back when the block ends
    assert got["kept"] - got["after"] > 32 << 20, got
    # huge pages: off inside the block only
    assert got["thp"] == [False, True, False]


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_blocks_nest_and_overlap_across_threads_and_the_last_to_end_trims():
    trims: list[int] = []
    lib = alloc._glibc()
    assert lib is not None

    class Counting:
        def __getattr__(self, name: str) -> object:
            return getattr(lib, name)

        def malloc_trim(self, pad: int) -> int:
            trims.append(pad)
            return lib.malloc_trim(pad)

    saved = alloc._libc
    alloc._libc = Counting()  # type: ignore[assignment]
    try:
        entered, release = threading.Barrier(3), threading.Event()

        def work() -> None:
            with alloc.batch_memory():
                with alloc.batch_memory():  # nested in the same thread
                    entered.wait(timeout=10)
                    release.wait(timeout=10)

        threads = [threading.Thread(target=work) for _ in range(2)]
        for t in threads:
            t.start()
        entered.wait(timeout=10)
        assert alloc._active == 4 and trims == []
        assert alloc.huge_pages_disabled() is True
        release.set()
        for t in threads:
            t.join(timeout=10)
        assert alloc._active == 0
        assert trims == [0]  # once, by the last block to end
        assert alloc.huge_pages_disabled() is False
    finally:
        alloc._libc = saved
