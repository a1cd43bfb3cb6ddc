"""Two processes creating the same new subjects at once get one key per subject (#15: the key store
stays consistent under parallel writers, before ingest's batches run in parallel).

The store takes SQLite's write lock (BEGIN IMMEDIATE) before it looks a blind index up, so lookup and
insert are one step across processes. Each worker waits at a barrier, then asks for the same ids —
all new on the first round — in a different order, several rounds; the ids overlap between rounds.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from governance.keys import KeyStore, generate_kek_b64, kek_from_env
from tests.keystore_helpers import check_layout

ROUNDS = 6
PER_ROUND = 400
VAR = "LW_CONCURRENCY_KEK"


def _ids(round_: int) -> list[str]:
    # each round: half the ids of the round before, half new
    start = round_ * PER_ROUND // 2
    return [f"person-{i:06d}" for i in range(start, start + PER_ROUND)]


def _worker(path: str, reverse: bool, barrier, out) -> None:  # noqa: ANN001 - multiprocessing objects
    got: dict[str, str] = {}
    with KeyStore(path, kek_from_env(VAR)) as store:
        for r in range(ROUNDS):
            ids = _ids(r)[::-1] if reverse else _ids(r)
            barrier.wait(timeout=60)
            got.update(zip(ids, store.tokens_for(ids)))
        deks = {t: store.dek(t).hex() for t in sorted(set(got.values()))[:50]}
    out.put((got, deks))


def _two_writers(worker, path: Path, *extra) -> list:  # noqa: ANN001 - a worker function
    """Run ``worker`` in two processes on one new store (created once, as the workspace does),
    the second asking in reverse order; their results."""
    KeyStore(path, kek_from_env(VAR)).close()
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(str(path), rev, barrier, out, *extra)) for rev in (False, True)]
    for p in procs:
        p.start()
    results = [out.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def test_two_writers_creating_the_same_new_subjects_yield_one_key_each(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(VAR, generate_kek_b64())
    path = tmp_path / "keys.db"
    (a, deks_a), (b, deks_b) = _two_writers(_worker, path)
    every = {i for r in range(ROUNDS) for i in _ids(r)}
    assert set(a) == set(b) == every
    assert a == b, "the two writers got different tokens for the same subject"
    assert len(set(a.values())) == len(every)
    assert check_layout(path)[0] == len(every)  # one key and one blind index a subject
    shared = set(deks_a) & set(deks_b)
    assert shared and all(deks_a[t] == deks_b[t] for t in shared)


BULK = 3000  # ids per bulk call: enough for the native path's sampled "new people" insert


def _bulk_worker(path: str, reverse: bool, barrier, out, fanout: int | None = None) -> None:  # noqa: ANN001
    import pyarrow as pa

    if fanout is not None:  # this process merges runs of blind indexes that often
        from governance.keys import store as store_mod

        store_mod.FANOUT = fanout
    got: dict[str, str] = {}
    keys: dict[str, str] = {}
    with KeyStore(path, kek_from_env(VAR)) as store:
        for r in range(3):
            # round 0: all new; round 1: all new again but other ids; round 2: half known
            start = (0, BULK, BULK + BULK // 2)[r]
            ids = [f"bulk-{i:06d}" for i in range(start, start + BULK)]
            ids = ids[::-1] if reverse else ids
            barrier.wait(timeout=60)
            res = store.subject_keys(pa.array(ids), keys=True)
            got.update(zip(ids, res.tokens.to_pylist()))
            keys.update((i, res.keys[j * 32 : (j + 1) * 32].hex()) for j, i in enumerate(ids))
    out.put((got, keys))


@pytest.mark.parametrize("fanout", [None, 2], ids=["default", "merging"])
def test_two_bulk_writers_creating_the_same_new_subjects_yield_one_key_each(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                           fanout: int | None):
    """The bulk path (ingest's): same ids at once from two processes, whole batches new. "merging":
    both merge every 2 runs of a level, so merges run between (and after) the other writer's
    batches, and each writer finds the other's subjects in runs it did not make; a blind index
    still ends in exactly one run."""
    monkeypatch.setenv(VAR, generate_kek_b64())
    path = tmp_path / "keys.db"
    (a, ka), (b, kb) = _two_writers(_bulk_worker, path, fanout)
    assert a == b and ka == kb, "the two writers got different tokens or keys for the same subject"
    every = BULK * 2 + BULK // 2
    assert len(a) == len(set(a.values())) == every
    live, levels = check_layout(path)
    assert live == every
    # three runs, one a round (whoever wrote first made it; the other found its people): merged by 2 or not
    assert levels == ({0: 3} if fanout is None else {0: 1, 1: 1}), levels
