"""The stream decoder: the native fast path gives exactly what the Python reference gives.

No broker here: the decoder takes ``(offset, value, timestamp)`` messages as the consumer hands
them over. Messages the native core is not sure of go to the Python decoder, so the reasons to
quarantine are the reference's by construction; what is checked here is everything else: each
value's text (Python's ``str`` of what ``json.loads`` returns, floats in ``repr`` form), the
columns a key reaches (stripped, any case), envelopes, and the subject check of sealed records.
"""

from __future__ import annotations

import base64
import json
import math
import random
import struct

import pyarrow as pa
import pytest
import yaml

from governance.keys import native
from lakehouse.stream import _Decoder, seal_dataset

NATIVE = native.backend() == "native"
needs_native = pytest.mark.skipif(not NATIVE, reason="the native core is not built (or LAKEWARDEN_NATIVE=0)")

PEOPLE = [f"C{i:05d}" for i in range(8)]


def _policy(project, dataset: str = "customers", **changes):
    p = project / "policies" / f"{dataset}.yaml"
    doc = yaml.safe_load(p.read_text())
    for k, v in changes.items():
        doc.setdefault(k, {}).update(v)
    p.write_text(yaml.safe_dump(doc, sort_keys=False))


def _decoder(project, **changes) -> tuple:
    from governance.workspace import Workspace

    _policy(project, **changes)
    ws = Workspace.open(project / "lakewarden.yaml")
    return ws, _Decoder(ws, "customers", ws.policies.dataset("customers"))


def _rec(i: int, **extra) -> dict:
    return {"customer_id": PEOPLE[i % len(PEOPLE)], "name": f"Person {i}", "email": f"p{i}@example.org",
            "phone": "+44 20 7946 0000", "birth_date": "1980-02-29", "zip_code": "02139", "sex": "F",
            "ethnicity": "group_a", "income": 1000.5 + i, "region": "north", "defaulted": i % 2 == 0, **extra}


def _envelope(tok: str, blob: bytes, **over) -> bytes:
    env = {"lakewarden": "sealed/v1", "subject": tok, "record": base64.b64encode(blob).decode(), **over}
    return json.dumps(env).encode()


def _corpus(ws) -> list[bytes | None]:
    """Every kind of message a topic can hold: good, odd and bad; raw and sealed."""
    ring = ws.keyring
    toks = dict(zip(PEOPLE, ring.tokens_for(PEOPLE)))
    ds = seal_dataset("customers")

    def seal(obj, person: str | None = None, raw: bytes | None = None) -> bytes:
        person = person or obj["customer_id"]
        data = raw if raw is not None else json.dumps(obj).encode()
        return _envelope(toks[person], ring.seal(data, token=toks[person], dataset=ds, column="record"))

    msgs: list[bytes | None] = []
    for i in range(40):  # plain records, keys in other cases and padded, floats and ints of every form
        msgs.append(json.dumps(_rec(i)).encode())
    literal = [b'1e5', b'1E+2', b'1.10', b'-0.0', b'-0', b'0', b'1e-7', b'0.0001', b'1e16', b'9999999999999998.0',
               b'123456789012345678901234567890', b'1e400', b'-1e400', b'2.5e-308', b'5e-324', b'0.1', b'100',
               b'3.141592653589793238462643383279', b'-12.340e3', b'7' * 5000]
    for lit in literal:
        msgs.append(b'{"customer_id": "C00001", "income": ' + lit + b', "region": "south"}')
    msgs += [
        b'{" Customer_ID ": "C00002", "EMAIL": "x@example.org", "Region": "east"}',
        b'{"customer_id": "C00003", "name": "caf\\u00e9 \\ud83d\\ude00 \\n\\"q\\"", "region": "west"}',
        b'{"customer_id": "C00003", "name": "\\ud800", "region": "west"}',  # a lone surrogate
        b'{"customer_id": "C00004", "name": null, "defaulted": true, "sex": false}',
        b'{"customer_id": "C00004", "email": "a@b.org", "email": "c@d.org"}',  # a duplicate key
        b'{"customer_id": "C00004", "email": "a@b.org", "Email": "c@d.org"}',  # the same column twice
        b'{"customer_id": "C00005", "\xc3\xa9mail": "x"}',  # a key that is not ASCII
        b'{"customer_id": "C00005", "nickname": "x"}',
        b'{"customer_id": "C00005", "nickname": {"a": 1}}',  # nested, in an unknown field
        b'{"customer_id": "C00005", "name": {"first": "A"}}',
        b'{"customer_id": "C00005", "name": ["A"]}',
        b'{"customer_id": "C00005", "income": NaN}', b'{"customer_id": "C00005", "income": Infinity}',
        b'\xef\xbb\xbf{"customer_id": "C00006"}', b'  {"customer_id": "C00006"}\n\t',
        b'{"customer_id": "C00006",}', b'{}', b'[1, 2]', b'"text"', b'42', b'null', b'not json', b'\xff\xfe', b'{"customer_id": "\xff"}',
        b'{"customer_id": "C0000' + b'7' * 6000 + b'"}', None, b'',
        b'{"lakewarden": "sealed/v1", "customer_id": "C00001"}',
    ]
    for i in range(30):  # sealed records
        msgs.append(seal(_rec(i)))
    good = ring.seal(json.dumps(_rec(1)).encode(), token=toks[PEOPLE[1]], dataset=ds, column="record")
    tampered = bytearray(good)
    tampered[-1] ^= 1
    b64 = base64.b64encode(good).decode()
    msgs += [
        seal({**_rec(2), "customer_id": PEOPLE[3]}, person=PEOPLE[2]),  # sealed for another subject
        seal({**_rec(2), " CUSTOMER_ID": PEOPLE[3]} | {"customer_id": None}, person=PEOPLE[2]),
        seal({**_rec(2), "customer_id": "nobody-known"}, person=PEOPLE[2]),
        seal(_rec(2), raw=b"not json"), seal(_rec(2), raw=b"[1]"), seal(_rec(2, nickname="x")),
        seal(_rec(2, name={"a": 1})), seal({**_rec(2), "lakewarden": "sealed/v1"}),
        seal({**_rec(2), "income": 1e22}), seal({k: v for k, v in _rec(2).items() if k != "customer_id"}, person=PEOPLE[2]),
        _envelope(toks[PEOPLE[1]], bytes(tampered)),
        _envelope("sub_unknownunknownunknownunkn", good),
        _envelope(toks[PEOPLE[1]], good, lakewarden="sealed/v9"),
        _envelope(toks[PEOPLE[1]], good, extra=1),
        json.dumps({"lakewarden": "sealed/v1", "subject": 7, "record": b64}).encode(),
        json.dumps({"lakewarden": "sealed/v1", "subject": toks[PEOPLE[1]], "record": b64.rstrip("=")}).encode(),
        json.dumps({"lakewarden": "sealed/v1", "subject": toks[PEOPLE[1]], "record": "!!" + b64}).encode(),
        b'{"lakewarden": "sealed/v1", "subject": "a", "subject": "b", "record": "AA=="}',
    ]
    return msgs


def _both(dec, msgs):
    batch = [(1000 + i, m, 0) for i, m in enumerate(msgs)]
    fast = dec._decode_native(batch)
    ref = dec._decode_python(batch)
    return fast, ref


def _same(fast, ref) -> None:
    assert fast is not None
    assert fast.offsets.to_pylist() == ref.offsets.to_pylist()
    assert fast.table.column_names == ref.table.column_names
    assert fast.table.to_pylist() == ref.table.to_pylist()
    key = lambda m: (m.row, m.reason, m.text)  # noqa: E731
    assert sorted(fast.malformed, key=key) == sorted(ref.malformed, key=key)


@needs_native
@pytest.mark.parametrize("sealed,unknown", [("optional", "reject"), ("optional", "drop"), ("required", "reject")])
def test_the_native_decoder_gives_what_the_python_decoder_gives(project, sealed, unknown):
    ws, dec = _decoder(project, stream={"sealed": sealed, "max_topic_retention": "24h", "max_message_bytes": 4096},
                       contract={"unknown_columns": unknown})
    ring = ws.keyring
    msgs = _corpus(ws)
    ring.shred(ring.token_for(PEOPLE[7]))  # a sealed record of an erased subject
    fast, ref = _both(dec, msgs)
    _same(fast, ref)
    assert fast.rows_read == len(msgs)
    # Most of it was decoded natively: only the odd messages went to Python.
    kinds, *_ = native.json_records(pa.array(msgs, pa.binary()), dec.lookup_lower, len(dec.names),
                                    drop_unknown=unknown == "drop", envelope="sealed/v1", max_bytes=4096)
    assert (kinds != native.PYTHON).sum() >= 90
    reasons = "\n".join(m.reason for m in ref.malformed)
    for expected in ("nested objects", "invalid JSON", "must be a JSON object", "not valid UTF-8", "tombstone",
                     "oversized", "sealed for another subject than its customer_id", "the subject's key was destroyed",
                     "tampered", "unknown subject token", "not a sealed/v1 envelope", "sealed record is not JSON",
                     "sealed record is not a JSON object"):
        assert expected in reasons, expected
    if sealed == "required":
        assert "not sealed for its subject" in reasons
    else:
        assert "field 'name' is not valid Unicode text" in reasons
    ws.close()


@needs_native
def test_a_batch_of_one_kind_and_an_empty_batch(project):
    ws, dec = _decoder(project, stream={"sealed": "optional", "max_topic_retention": "24h"})
    for msgs in ([], [b"nope"] * 3, [json.dumps(_rec(i)).encode() for i in range(5)], [None]):
        _same(*_both(dec, msgs))
    ws.close()


def _float_literals(n: int, seed: int = 11) -> list[str]:
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        kind = rnd.randrange(4)
        if kind == 0:  # any finite double, from its bits
            x = struct.unpack("<d", rnd.getrandbits(64).to_bytes(8, "little"))[0]
            if math.isfinite(x):
                out.append(repr(x))
        elif kind == 1:  # decimal literals as people write them
            out.append(f"{rnd.randrange(-10**6, 10**6)}.{rnd.randrange(10**rnd.randrange(1, 8))}")
        elif kind == 2:  # exponents around the switch to scientific notation
            out.append(f"{rnd.randrange(1, 10**rnd.randrange(1, 17))}e{rnd.randrange(-25, 25)}")
        else:
            out.append(repr(rnd.uniform(-1e3, 1e3) * 10 ** rnd.randrange(-20, 20)))
    return out


@needs_native
def test_floats_read_as_python_reads_them():
    lits = _float_literals(20_000) + ["1e16", "1e15", "1e-4", "1e-5", "0.5e-4", "123456789012345680000.0",
                                      "-0.0", "0.0", "1.7976931348623157e308", "4.9e-324"]
    msgs = pa.array([b'{"v": ' + lit.encode() + b"}" for lit in lits], pa.binary())
    kinds, cols, _t, _b = native.json_records(msgs, {"v": 0}, 1, drop_unknown=False)
    assert (kinds == native.RECORD).all()
    assert cols[0].to_pylist() == [str(json.loads(lit)) for lit in lits]


def test_values_become_the_text_python_gives_them(project):
    """Through the decoder as a stream uses it: the native core when built, else Python."""
    ws, dec = _decoder(project, stream={"sealed": "optional", "max_topic_retention": "24h"},
                       contract={"unknown_columns": "drop"})
    msgs = [b'{"customer_id": "C1", "income": 1e5, "defaulted": true, "name": null, "zip_code": 2139, "x": [1]}',
            b'{"CUSTOMER_ID ": "C2", "income": -0, "defaulted": false, "sex": "F", "birth_date": "1990-01-01"}',
            b'{"customer_id": "C3", "income": 1e-7, "region": "caf\\u00e9"}']
    out = dec.decode([(i, m, 0) for i, m in enumerate(msgs)])
    rows = out.table.to_pylist()
    assert [r["customer_id"] for r in rows] == ["C1", "C2", "C3"]
    assert [r["income"] for r in rows] == ["100000.0", "0", "1e-07"]
    assert [r["defaulted"] for r in rows] == ["true", "false", None]
    assert rows[0]["zip_code"] == "2139" and rows[0]["name"] is None and rows[2]["region"] == "café"
    assert out.offsets.to_pylist() == [0, 1, 2] and out.malformed == []
    ws.close()


def test_a_sealed_record_naming_its_subject_under_a_padded_key_is_still_checked(project):
    """The subject's field is found as every field is (stripped, any case), so padding the key
    cannot hide the subject a record names from the check against the seal's subject."""
    ws, dec = _decoder(project, stream={"sealed": "required"})
    ring = ws.keyring
    a, b = ring.tokens_for(["C00001", "C00002"])
    rec = {k: v for k, v in _rec(1).items() if k != "customer_id"} | {" Customer_Id ": "C00002"}
    blob = ring.seal(json.dumps(rec).encode(), token=a, dataset=seal_dataset("customers"), column="record")
    out = dec.decode([(5, _envelope(a, blob), 0)])
    assert out.table.num_rows == 0
    assert [m.reason for m in out.malformed] == ["sealed for another subject than its customer_id"]
    ws.close()
