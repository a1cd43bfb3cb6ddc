"""Benchmark `policy suggest` on three files whose personal data is known (run by hand; not a timed test).

The files are made three different ways, deterministically, with no real person in them:

* ``customers.csv`` -- the demo's own generator (``lakehouse.synth.generate``, 1 % bad rows):
  customer_id, name, email, phone (+1 NNN-555-01NN), birth_date (ISO), zip_code (5 digits), ...
* ``clients.parquet`` -- typed Parquet, British conventions: client_ref, full_name, mail, mobile
  (+44 7700 900NNN, Ofcom's drama range), dob as dd/mm/yyyy text, UK postcode, notes (free text,
  some naming the client or a phone), nin (National Insurance number with the never-issued QQ
  prefix); and public columns, among them a 4-digit branch_code with leading zeros (a trap for
  the postcode detector), product names in Title Case (a trap for the name detector) and typed
  balance / tenure / opened / consent columns.
* ``members.jsonl`` -- JSON Lines, US/Czech conventions: member_number (a JSON number), given_name
  and family_name (Czech names: not in the detector's name lists), contact (e-mails under a name
  that does not say so), tel as (NNN) 555-01NN, birthday (ISO), zip (ZIP and ZIP+4 mixed), ssn
  (9NN-NN-NNNN: never issued as SSNs), ip_address (documentation ranges), comment (free text, some
  empty); and public columns, among them referrer_code (unique codes: a trap for the subject key)
  and club (Title Case place names: a trap for the name detector).

Each file is also scored with its column names replaced by col_1, col_2, ...: what the content
alone tells.

Names come from Faker pools seeded once; rows are composed with numpy (PCG64, fixed seeds).
For each file the script runs :func:`lakehouse.suggest.suggest_policy` and compares the
identifier columns it proposes (subject key, direct and quasi-identifiers) with the truth:
recall, precision, the exact class, and whether the subject key is right. Results go to
benchmarks/results/suggest.json and are printed as a table.

    .venv/bin/python benchmarks/bench_suggest.py [--rows 5000] [--sample 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SUBJECT, DIRECT, QUASI, SENSITIVE, PUBLIC = "subject_key", "direct_identifier", "quasi_identifier", "sensitive", "public"
IDENTIFIER_CLASSES = (SUBJECT, DIRECT, QUASI)

CUSTOMERS_TRUTH = {
    "customer_id": SUBJECT, "name": DIRECT, "email": DIRECT, "phone": DIRECT, "birth_date": QUASI,
    "zip_code": QUASI, "sex": SENSITIVE, "ethnicity": SENSITIVE, "income": PUBLIC, "region": PUBLIC,
    "defaulted": PUBLIC,
}
CLIENTS_TRUTH = {
    "client_ref": SUBJECT, "full_name": DIRECT, "mail": DIRECT, "mobile": DIRECT, "dob": QUASI,
    "postcode": QUASI, "notes": DIRECT, "nin": DIRECT, "segment": PUBLIC, "branch_code": PUBLIC,
    "balance": PUBLIC, "tenure_months": PUBLIC, "opened": PUBLIC, "marketing_consent": PUBLIC,
    "risk_band": PUBLIC, "product": PUBLIC,
}
MEMBERS_TRUTH = {
    "member_number": SUBJECT, "given_name": DIRECT, "family_name": DIRECT, "contact": DIRECT, "tel": DIRECT,
    "birthday": QUASI, "zip": QUASI, "ssn": DIRECT, "ip_address": DIRECT, "comment": DIRECT, "gender": SENSITIVE,
    "plan": PUBLIC, "monthly_fee": PUBLIC, "visits": PUBLIC, "newsletter": PUBLIC, "signup_ts": PUBLIC,
    "referrer_code": PUBLIC, "club": PUBLIC,
}


def _rng(seed: int, purpose: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(purpose,))))


def _pools(locale: str, seed: int, n: int = 400) -> tuple[list[str], list[str]]:
    from faker import Faker

    fake = Faker(locale)
    fake.seed_instance(seed)
    return [fake.first_name() for _ in range(n)], [fake.last_name() for _ in range(n)]


def _ascii(s: str) -> str:
    import unicodedata

    return "".join(c for c in unicodedata.normalize("NFKD", s) if c.isascii() and (c.isalnum() or c in ".-_"))


def _birthdays(rng: np.random.Generator, n: int, first: int, last: int) -> list[date]:
    lo, hi = date(first, 1, 1).toordinal(), date(last, 12, 31).toordinal()
    return [date.fromordinal(int(x)) for x in rng.integers(lo, hi + 1, size=n)]


# ----------------------------------------------------------------------------- the three files


def make_customers(folder: Path, rows: int, seed: int = 11) -> Path:
    """The demo's customers file (CSV), made by the demo's own generator."""
    from lakehouse.synth import generate

    res = generate(folder, people=rows, transactions_per_person=0, seed=seed, bad_rows=0.01, overwrite=True)
    os.unlink(res.files["transactions"])
    return res.files["customers"]


_NOTES_A = ("Called about", "Wrote in about", "Asked about", "Complained about", "Visited the branch about",
            "Emailed regarding", "Phoned regarding", "Followed up on")
_NOTES_B = ("the overdraft limit", "a card that was declined abroad", "moving house next month",
            "the mortgage renewal", "a missing statement", "closing the joint account", "fees on the savings account",
            "a change of address", "the new mobile app", "a standing order to the landlord")
_NOTES_C = ("prefers contact by e-mail.", "call back after 5pm on {phone}.", "spoke with {first} in person.",
            "no further action.", "sent the forms by post.", "{first} will bring ID on Friday.",
            "escalated to the branch manager.", "wants a paper copy of every letter.")


def make_clients_parquet(path: Path, rows: int, seed: int = 12) -> Path:
    """A typed Parquet file with British conventions (see the module docstring)."""
    rng = _rng(seed, 1)
    first, last = _pools("en_GB", seed)
    fi = rng.integers(0, len(first), rows)
    li = rng.integers(0, len(last), rows)
    middle = rng.random(rows) < 0.12
    mi = rng.integers(0, len(first), rows)
    names = [
        f"{first[f]} {first[m]} {last[k]}" if mid else f"{first[f]} {last[k]}"
        for f, k, m, mid in zip(fi, li, mi, middle)
    ]
    ref_digits = rng.choice(10**8, size=rows, replace=False)
    ref_letters = rng.integers(0, 26, size=(rows, 2))
    refs = [f"CR{d:08d}{chr(65 + a)}{chr(65 + b)}" for d, (a, b) in zip(ref_digits, ref_letters)]
    domains = ("example.com", "example.net", "mail.example.org")
    dom = rng.integers(0, len(domains), rows)
    num = rng.integers(1, 999, rows)
    mails = [f"{_ascii(first[f]).lower()}.{_ascii(last[k]).lower()}{n}@{domains[d]}"
             for f, k, n, d in zip(fi, li, num, dom)]
    line = rng.integers(0, 1000, rows)
    spaced = rng.random(rows) < 0.7
    mobiles = [f"+44 7700 900{x:03d}" if sp else f"+447700900{x:03d}" for x, sp in zip(line, spaced)]
    dobs = [d.strftime("%d/%m/%Y") for d in _birthdays(rng, rows, 1938, 2005)]
    areas = ("SW", "EC", "M", "B", "LS", "G", "EH", "CF", "BT", "NE", "L", "BS", "OX", "CB")
    letters = "ABDEFGHJLNPQRSTUWXYZ"
    pc_area = rng.integers(0, len(areas), rows)
    pc_dist = rng.integers(1, 20, rows)
    pc_sector = rng.integers(0, 10, rows)
    pc_unit = rng.integers(0, len(letters), size=(rows, 2))
    postcodes = [f"{areas[a]}{d} {s}{letters[u[0]]}{letters[u[1]]}"
                 for a, d, s, u in zip(pc_area, pc_dist, pc_sector, pc_unit)]
    na, nb, nc = (rng.integers(0, len(x), rows) for x in (_NOTES_A, _NOTES_B, _NOTES_C))
    notes = [f"{_NOTES_A[a]} {_NOTES_B[b]}; " + _NOTES_C[c].format(phone=mobiles[i], first=first[fi[i]])
             for i, (a, b, c) in enumerate(zip(na, nb, nc))]
    nin_digits = rng.integers(0, 10**6, rows)
    nin_suffix = rng.integers(0, 4, rows)
    nin_spaced = rng.random(rows) < 0.5
    nins = []
    for d, s, sp in zip(nin_digits, nin_suffix, nin_spaced):
        digits = f"{d:06d}"
        suffix = "ABCD"[s]
        nins.append(f"QQ {digits[:2]} {digits[2:4]} {digits[4:]} {suffix}" if sp else f"QQ{digits}{suffix}")
    segments = np.array(["retail", "sme", "private_banking"])[rng.choice(3, rows, p=[0.8, 0.15, 0.05])]
    branch = [f"{x:04d}" for x in rng.integers(1, 700, rows)]
    balance = np.round(rng.lognormal(7.5, 1.3, rows) * np.where(rng.random(rows) < 0.06, -0.3, 1.0), 2)
    tenure = rng.integers(1, 240, rows)
    opened = [date(2024, 6, 30) - timedelta(days=int(30.4 * t)) for t in tenure]
    consent = rng.random(rows) < 0.4
    risk = np.array(list("ABCDE"))[rng.choice(5, rows, p=[0.2, 0.35, 0.25, 0.15, 0.05])]
    products = np.array(["Everyday Saver", "Fixed Rate Bond", "Current Account", "Junior Isa", "Premier Account",
                         "Cash Isa"])[rng.integers(0, 6, rows)]
    table = pa.table({
        "client_ref": pa.array(refs), "full_name": pa.array(names), "mail": pa.array(mails),
        "mobile": pa.array(mobiles), "dob": pa.array(dobs), "postcode": pa.array(postcodes),
        "notes": pa.array(notes), "nin": pa.array(nins), "segment": pa.array(segments.tolist()),
        "branch_code": pa.array(branch), "balance": pa.array(balance, pa.float64()),
        "tenure_months": pa.array(tenure, pa.int64()), "opened": pa.array(opened, pa.date32()),
        "marketing_consent": pa.array(consent), "risk_band": pa.array(risk.tolist()),
        "product": pa.array(products.tolist()),
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=min(rows, 2048))
    return path


_COMMENTS = ("Loves the evening classes", "Asked to pause the membership over summer", "Card reader did not work",
             "Referred two friends", "Requested a refund for March", "Injured knee, avoid high impact",
             "Prefers the downtown location", "Changed plan after the price rise", "Left a review online",
             "Wants invoices sent to her accountant")
_COMMENT_TAIL = ("", " - call {tel}", " (see ticket {ticket})", " - mail {mail}", ", thanks from {given}")


def make_members_jsonl(path: Path, rows: int, seed: int = 13) -> Path:
    """A JSON Lines file with US/Czech conventions (see the module docstring)."""
    rng = _rng(seed, 2)
    first, last = _pools("cs_CZ", seed)
    fi = rng.integers(0, len(first), rows)
    li = rng.integers(0, len(last), rows)
    numbers = 100_000 + rng.choice(900_000, size=rows, replace=False)
    domains = ("example.com", "example.org", "example.net")
    dom = rng.integers(0, 3, rows)
    num = rng.integers(1, 99, rows)
    mails = [f"{_ascii(first[f]).lower()}{n}@{domains[d]}" for f, n, d in zip(fi, num, dom)]
    area = rng.integers(201, 990, rows)
    line = rng.integers(0, 100, rows)
    tels = [f"({a}) 555-01{x:02d}" for a, x in zip(area, line)]  # 555-0100..0199: reserved for fiction
    bdays = [d.isoformat() for d in _birthdays(rng, rows, 1945, 2006)]
    z5 = rng.integers(1000, 99999, rows)
    z4 = rng.integers(0, 10000, rows)
    plus4 = rng.random(rows) < 0.5
    zips = [f"{a:05d}-{b:04d}" if p else f"{a:05d}" for a, b, p in zip(z5, z4, plus4)]
    ssns = [f"9{a:02d}-{b:02d}-{c:04d}" for a, b, c in zip(rng.integers(0, 100, rows), rng.integers(1, 100, rows),
                                                           rng.integers(1, 10000, rows))]
    v6 = rng.random(rows) < 0.2
    ipnets = ("192.0.2", "198.51.100", "203.0.113")
    ipn = rng.integers(0, 3, rows)
    host = rng.integers(1, 255, rows)
    ips = [f"2001:db8::{h:x}:{i}" if six else f"{ipnets[n]}.{h}" for h, n, six, i in zip(host, ipn, v6, range(rows))]
    ca, ct = rng.integers(0, len(_COMMENTS), rows), rng.integers(0, len(_COMMENT_TAIL), rows)
    tickets = rng.integers(1000, 9999, rows)
    has_comment = rng.random(rows) < 0.7
    comments = [
        (_COMMENTS[a] + _COMMENT_TAIL[t].format(tel=tels[i], mail=mails[i], given=first[fi[i]], ticket=tickets[i]))
        if has_comment[i] else None
        for i, (a, t) in enumerate(zip(ca, ct))
    ]
    genders = np.array(["female", "male", "non-binary", "prefer not to say"])[
        rng.choice(4, rows, p=[0.49, 0.47, 0.02, 0.02])]
    plans = np.array(["basic", "plus", "premium"])[rng.choice(3, rows, p=[0.5, 0.35, 0.15])]
    fee = {"basic": 19.0, "plus": 29.5, "premium": 49.99}
    visits = rng.poisson(6, rows)
    newsletter = rng.random(rows) < 0.3
    start = 1_577_836_800  # 2020-01-01T00:00:00Z
    ts = start + rng.integers(0, 4 * 365 * 86400, rows)
    from datetime import datetime, timezone

    stamps = [datetime.fromtimestamp(int(t), tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") for t in ts]
    codes = rng.choice(36**6, size=rows, replace=False)
    clubs = ("Brno Centrum", "Brno Lesna", "Praha Vinohrady", "Praha Smichov", "Praha Karlin", "Ostrava Poruba",
             "Plzen Bory", "Olomouc Nova Ulice", "Liberec Centrum", "Pardubice Dukla", "Zlin Jizni Svahy",
             "Kladno Krocehlavy")
    club = rng.integers(0, len(clubs), rows)

    def b36(x: int) -> str:
        s = ""
        for _ in range(6):
            x, r = divmod(int(x), 36)
            s = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"[r] + s
        return s

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(rows):
            rec = {
                "member_number": int(numbers[i]), "given_name": first[fi[i]], "family_name": last[li[i]],
                "contact": mails[i], "tel": tels[i], "birthday": bdays[i], "zip": zips[i], "ssn": ssns[i],
                "ip_address": ips[i], "comment": comments[i], "gender": str(genders[i]), "plan": str(plans[i]),
                "monthly_fee": fee[str(plans[i])], "visits": int(visits[i]), "newsletter": bool(newsletter[i]),
                "signup_ts": stamps[i], "referrer_code": "R" + b36(codes[i]), "club": clubs[club[i]],
            }
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


def make_all(folder: Path, rows: int) -> list[tuple[Path, dict[str, str], str]]:
    """The three files with their truth and how each was made."""
    return [
        (make_customers(folder / "demo", rows), CUSTOMERS_TRUTH, "lakehouse.synth (the demo)"),
        (make_clients_parquet(folder / "clients.parquet", rows), CLIENTS_TRUTH, "numpy + Faker en_GB pools, typed"),
        (make_members_jsonl(folder / "members.jsonl", rows), MEMBERS_TRUTH, "numpy + Faker cs_CZ pools"),
    ]


def hide_names(path: Path, truth: dict[str, str]) -> tuple[Path, dict[str, str]]:
    """The same file with its columns renamed col_1, col_2, ...: what content alone tells."""
    out = path.with_name(path.stem + "_unnamed" + path.suffix)
    names = list(truth)
    new = {n: f"col_{i + 1}" for i, n in enumerate(names)}
    if path.suffix == ".parquet":
        t = pq.read_table(path)
        pq.write_table(t.rename_columns([new[c] for c in t.column_names]), out)
    elif path.suffix == ".csv":
        with open(path, encoding="utf-8") as src, open(out, "w", encoding="utf-8") as dst:
            header = [h.strip('"') for h in src.readline().rstrip("\n").split(",")]
            dst.write(",".join(new[h] for h in header) + "\n")
            for line in src:
                dst.write(line)
    else:
        with open(path, encoding="utf-8") as src, open(out, "w", encoding="utf-8") as dst:
            for line in src:
                rec = json.loads(line)
                dst.write(json.dumps({new[k]: v for k, v in rec.items()}, ensure_ascii=False) + "\n")
    return out, {new[c]: k for c, k in truth.items()}


# ----------------------------------------------------------------------------- scoring


def score(suggestion, truth: dict[str, str]) -> dict:  # noqa: ANN001 - a PolicySuggestion
    """Recall and precision of the identifier columns (subject key + direct + quasi) against ``truth``."""
    got = {c.name: c.class_.value for c in suggestion.columns}
    true_ids = {c for c, k in truth.items() if k in IDENTIFIER_CLASSES}
    pred_ids = {c for c, k in got.items() if k in IDENTIFIER_CLASSES}
    tp = true_ids & pred_ids
    exact = sum(1 for c in true_ids if got.get(c) == truth[c])
    return {
        "columns": len(truth),
        "identifiers": len(true_ids),
        "found": len(pred_ids),
        "true_positives": len(tp),
        "missed": sorted(true_ids - pred_ids),
        "false_alarms": sorted(pred_ids - true_ids),
        "recall": len(tp) / len(true_ids) if true_ids else 1.0,
        "precision": len(tp) / len(pred_ids) if pred_ids else 1.0,
        "exact_class": exact / len(true_ids) if true_ids else 1.0,
        "wrong_class": sorted(c for c in true_ids & pred_ids if got[c] != truth[c]),
        "subject_key": suggestion.subject_key.column,
        "subject_key_confidence": suggestion.subject_key.confidence,
        "subject_key_right": truth.get(suggestion.subject_key.column) == SUBJECT,
        "sensitive_found": sorted(c for c, k in got.items() if k == SENSITIVE),
    }


def ingest_with_drafts(folder: Path, drafts: list[tuple[str, str, Path]]) -> dict[str, dict]:
    """Ingest each file (a copy) under its draft, in a fresh project with the repository's role catalog:
    how many rows the draft's contract accepts and quarantines, and why."""
    import shutil

    from governance.setup import init_workspace
    from governance.workspace import Workspace
    from lakehouse.ingest import ingest

    proj = folder / "project"
    (proj / "policies").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "policies" / "roles.yaml", proj / "policies" / "roles.yaml")
    for dataset, text, _ in drafts:
        (proj / "policies" / f"{dataset}.yaml").write_text(text)
    init_workspace(proj, actor="bench")
    out: dict[str, dict] = {}
    ws = Workspace.open(proj / "lakewarden.yaml")
    try:
        for dataset, _, path in drafts:
            copy = proj / "landing" / path.name
            copy.parent.mkdir(exist_ok=True)
            shutil.copy(path, copy)
            rep = ingest(ws, ws.actor("dana"), dataset, [copy])
            out[dataset] = {"read": rep.rows_read, "accepted": rep.rows_accepted,
                            "quarantined": rep.rows_quarantined, "reasons": dict(rep.reasons.most_common(5))}
    finally:
        ws.close()
    return out


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    from lakehouse.suggest import suggest_policy

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=5000, help="rows per file")
    ap.add_argument("--sample", type=int, default=1000, help="rows policy suggest samples")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "suggest.json")
    ap.add_argument("--keep", type=Path, default=None, help="also write the files and drafts here")
    ap.add_argument("--no-ingest", action="store_true", help="skip ingesting each file under its draft")
    args = ap.parse_args()
    console = Console() if Console().is_terminal else Console(width=200)
    results = []
    with tempfile.TemporaryDirectory() as d:
        folder = args.keep or Path(d)
        runs = []
        drafts: list[tuple[str, str, Path]] = []
        for path, truth, how in make_all(folder, args.rows):
            runs.append((path, truth, how, "as written"))
            hidden, htruth = hide_names(path, truth)
            runs.append((hidden, htruth, how, "names hidden"))
        for path, truth, how, names in runs:
            t0 = time.perf_counter()
            s = suggest_policy(path, sample=args.sample, today=date(2026, 1, 1))
            took = time.perf_counter() - t0
            if args.keep:
                (folder / f"{s.dataset}.draft.yaml").write_text(s.to_yaml())
            if names == "as written":
                drafts.append((s.dataset, s.to_yaml(), path))
            r = score(s, truth)
            r.update(file=path.name, format=s.format, made_by=how, column_names=names, rows=args.rows,
                     sample=s.rows_sampled,
                     seconds=round(took, 3))
            results.append(r)
        ingested = {} if args.no_ingest else ingest_with_drafts(folder, drafts)
    t = Table(title=f"policy suggest: identifier columns (subject key + direct + quasi), {args.sample:,}-row sample")
    for c in ("file", "column names", "columns", "identifiers", "found", "recall", "precision", "exact class",
              "subject key", "missed / false alarms", "time"):
        t.add_column(c)
    for r in results:
        t.add_row(
            r["file"], r["column_names"], str(r["columns"]), str(r["identifiers"]), str(r["found"]),
            f"{r['recall']:.2f}", f"{r['precision']:.2f}", f"{r['exact_class']:.2f}",
            f"{r['subject_key']} ({r['subject_key_confidence']})" + ("" if r["subject_key_right"] else " WRONG"),
            ", ".join(r["missed"]) + " / " + ", ".join(r["false_alarms"]) if r["missed"] or r["false_alarms"] else "-",
            f"{r['seconds']:.2f}s",
        )
    for names in ("as written", "names hidden"):
        rs = [r for r in results if r["column_names"] == names]
        tp = sum(r["true_positives"] for r in rs)
        idn = sum(r["identifiers"] for r in rs)
        found = sum(r["found"] for r in rs)
        t.add_row("all three", names, str(sum(r["columns"] for r in rs)), str(idn), str(found), f"{tp / idn:.2f}",
                  f"{tp / found:.2f}" if found else "-", "", "", "", "")
    console.print(t)
    if ingested:
        g = Table(title="each file ingested under its draft, unchanged (customers.csv has 1 % injected bad rows)")
        for c in ("dataset", "rows read", "bad rows in the file", "accepted", "quarantined", "top reasons"):
            g.add_column(c)
        for ds, r in ingested.items():
            g.add_row(ds, f"{r['read']:,}", f"{r['read'] - args.rows:,}", f"{r['accepted']:,}", f"{r['quarantined']:,}",
                      "; ".join(f"{k} ({v})" for k, v in r["reasons"].items()) or "-")
        console.print(g)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                                    "files": results, "ingested_under_draft": ingested}, indent=2) + "\n")
    console.print(f"written to {args.out}")


if __name__ == "__main__":
    main()
