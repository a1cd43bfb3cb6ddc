"""The secrets scan of issue #19 finds what it must (tests/secrets_scan.py; the session runs it in
tests/conftest.py): a planted secret in a zstd Parquet column of a real Delta table, in a Delta
log, in a gzip and a zstd file, in a SQLite table, as base64 of a KEK, and in a process's
arguments; its report names the place and what was found, never the value; an allowed place and a
clean folder give nothing.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import secrets
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
import secrets_scan
from secrets_scan import Registry, scan_files, scan_processes

SECRET = "pw-" + secrets.token_urlsafe(18)  # made at run time: a value committed to git is public, not a secret
WHAT = "Keycloak password of carla"


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """A folder for planted secrets; the marker beside it keeps the session's own scan out."""
    (tmp_path / secrets_scan.PLANTED_MARKER).write_text("known answers of tests/test_secrets_scan.py\n")
    (tmp_path / "planted").mkdir()
    return tmp_path / "planted"


@pytest.fixture
def reg() -> Registry:
    r = Registry()
    assert r.register(SECRET, WHAT)
    return r


def _found(report: secrets_scan.ScanReport) -> set[tuple[str, str, str]]:
    return {(f.where, f.how, f.what) for f in report.findings}


def test_a_clean_folder_gives_nothing(planted: Path, reg: Registry) -> None:
    (planted / "log.txt").write_text("nothing here but pw-Zq81xYk2 (a prefix is no leak)\n")
    (planted / "data.bin").write_bytes(os.urandom(200_000))
    report = scan_files(planted, reg)
    assert report.findings == [] and report.files == 2


def test_a_secret_in_a_zstd_parquet_column_of_a_delta_table_is_found(planted: Path, reg: Registry) -> None:
    from deltalake import WriterProperties, write_deltalake

    notes = [f"note {i}: checked meter {i * 7919 % 10007} at site {i % 13}" for i in range(2000)]
    notes[1000] = f"note 1000: login with {SECRET} worked"  # neither the column's min nor its max
    table = pa.table({"id": pa.array(range(2000), pa.int64()), "note": notes})
    write_deltalake(planted / "silver", table, writer_properties=WriterProperties(compression="ZSTD"))
    parts = list((planted / "silver").glob("*.parquet"))
    assert len(parts) == 1 and SECRET.encode() not in parts[0].read_bytes()  # a byte scan would miss it

    report = scan_files(planted, reg)
    rel = parts[0].relative_to(planted).as_posix()
    assert _found(report) == {(rel, "parquet column note", WHAT)}


def test_a_secret_in_the_delta_log_is_found(planted: Path, reg: Registry) -> None:
    from deltalake import CommitProperties, write_deltalake

    write_deltalake(planted / "audit", pa.table({"x": [1, 2]}),
                    commit_properties=CommitProperties(custom_metadata={"operator": f"token={SECRET}"}))
    report = scan_files(planted, reg)
    assert ("audit/_delta_log/00000000000000000000.json", "raw bytes", WHAT) in _found(report)


def test_secrets_inside_gzip_zstd_and_sqlite_files_are_found(planted: Path, reg: Registry) -> None:
    import zstandard

    line = f"2024-05-01 INFO POST /token password={SECRET}\n".encode()
    (planted / "server.log.gz").write_bytes(gzip.compress(b"start\n" * 1000 + line))
    (planted / "events.zst").write_bytes(zstandard.ZstdCompressor().compress(b"start\n" * 1000 + line))
    with sqlite3.connect(planted / "online.db") as db:
        db.execute("CREATE TABLE features (entity TEXT, value BLOB)")
        db.execute("INSERT INTO features VALUES (?, ?)", ("meter-1", json.dumps({"auth": SECRET}).encode()))
    db.close()

    found = _found(scan_files(planted, reg))
    assert ("server.log.gz", "gzip", WHAT) in found
    assert ("events.zst", "zstd", WHAT) in found
    assert ("online.db", "sqlite table features", WHAT) in found


def test_a_kek_is_found_as_base64_hex_and_raw_bytes(planted: Path) -> None:
    kek = bytes([251, 255, 254]) + os.urandom(29)  # base64 and base64url differ
    reg = Registry()
    reg.register(kek, "KEK kek-0123 (env)")
    (planted / "manifest.json").write_text(json.dumps({"kek": base64.urlsafe_b64encode(kek).decode()}))
    (planted / "debug.txt").write_text(f"key {kek.hex()}\n")
    (planted / "state.bin").write_bytes(os.urandom(100_000) + kek + os.urandom(1000))
    report = scan_files(planted, reg)
    assert {(f.where, f.encoding) for f in report.findings} == {
        ("manifest.json", "base64url"), ("debug.txt", "hex"), ("state.bin", "plain")}


def test_the_report_names_the_place_and_what_but_never_the_secret(planted: Path, reg: Registry) -> None:
    (planted / "lineage").mkdir()
    (planted / "lineage" / "run.json").write_text(json.dumps({"args": ["--password", SECRET]}))
    report = scan_files(planted, reg)
    text = report.format()
    assert SECRET not in text and SECRET[:12] not in text
    assert f"LEAK lineage/run.json [raw bytes]: {WHAT} (sha256 {secrets_scan.fingerprint(SECRET.encode())}" in text


def test_allowed_places_are_left_out_and_counted(planted: Path, reg: Registry) -> None:
    cache = planted / "home" / ".cache" / "lakewarden" / "tokens"
    cache.mkdir(parents=True)
    (cache / "ws-1.json").write_text(json.dumps({"access_token": SECRET}))
    pg = planted / "pg" / "data"
    pg.mkdir(parents=True)
    (pg / "PG_VERSION").write_text("16\n")
    (pg / "heap").write_text(SECRET)
    kek_file = planted / "elsewhere.txt"
    kek_file.write_text(SECRET)
    reg.allow(kek_file, "KEK file (test)")

    report = scan_files(planted, reg)
    assert report.findings == []
    reasons = {a.pattern or a.folder_marker: a.reason for a in secrets_scan.ALLOWED}
    assert report.allowed == {reasons["*.cache/lakewarden/tokens/*"]: 1, reasons["PG_VERSION"]: 2,
                              "KEK file (test)": 1}
    (planted / "leak.txt").write_text(SECRET)  # the same value outside them is found
    assert _found(scan_files(planted, reg)) == {("leak.txt", "raw bytes", WHAT)}


def test_harvest_registers_what_the_allowed_files_hold(planted: Path) -> None:
    cache = planted / "home" / ".cache" / "lakewarden" / "tokens"
    cache.mkdir(parents=True)
    (cache / "ws-1.json").write_text(json.dumps({"access_token": "eyJ-access-" + "a" * 30, "refresh_token": None}))
    reg = Registry()
    assert secrets_scan.harvest(planted, reg) == 1
    (planted / "cli.log").write_text("Authorization: Bearer eyJ-access-" + "a" * 30)
    assert _found(scan_files(planted, reg)) == {("cli.log", "raw bytes", "access token cached by lakewarden login")}


def test_short_values_are_not_registered_and_large_files_are_skipped(planted: Path, reg: Registry) -> None:
    assert not reg.register("short", "a short password") and not reg.register(None, "none")
    assert not reg.register("A" * 40, "a placeholder, not a secret")
    assert not reg.register(bytes(range(32)), "a test's fixed KEK") and not reg.register(bytes(range(131, 99, -1)), "")
    assert not reg.register("pw-committed-to-git-Q7xk2Lm9", "a fixed password of a test: public once committed")
    (planted / "big.log").write_text(SECRET * 100)
    report = scan_files(planted, reg, max_bytes=1000)
    assert report.findings == [] and report.too_large == [("big.log", len(SECRET) * 100)]


def test_a_secret_in_a_process_argument_is_found(reg: Registry) -> None:
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"--password={SECRET}"])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            found = [f for f in scan_processes(reg) if f.where.startswith(f"pid {p.pid} ")]
            if found:
                break
            time.sleep(0.05)
        assert [(f.how, f.what) for f in found] == [("process arguments", WHAT)]
        assert SECRET not in found[0].line()
    finally:
        p.kill()
        p.wait(10)
    assert not [f for f in scan_processes(reg) if f.where.startswith(f"pid {p.pid} ")]


def test_watched_sources_register_kek_and_tokens_and_are_put_back(planted: Path) -> None:
    from governance.keys import kek as kek_mod
    from governance.tokens import TokenSet

    reg = Registry()
    before = (kek_mod.LocalKek.__init__, TokenSet.__dict__["from_response"], kek_mod.generate_kek_b64)
    restore = secrets_scan.watch_sources(reg)
    try:
        text = kek_mod.generate_kek_b64()
        key = kek_mod.kek_from_env.__globals__["_decode_key"](text)
        kek_mod.LocalKek(key, source="env:TEST")
        TokenSet.from_response("https://idp", "cli", {"access_token": "eyJ.test-access.Qx81Lm2Zr7" * 2,
                                                        "refresh_token": "eyJ.test-refresh.Pw19Kd3Ys5" * 2}, now=0)
        kek_mod.generate_kek_file(planted / "secrets" / "kek.key")
    finally:
        restore()
    assert (kek_mod.LocalKek.__init__, TokenSet.__dict__["from_response"], kek_mod.generate_kek_b64) == before
    whats = {s.what.split(" kek-")[0] for s in reg._values.values()}
    assert whats == {"KEK (base64, generated)", "KEK", "access token (client cli)", "refresh token (client cli)"}
    assert os.path.realpath(planted / "secrets" / "kek.key") in reg.allowed_paths
    (planted / "out.txt").write_text(text)
    assert "KEK (base64, generated)" in [f.what for f in scan_files(planted, reg).findings]
