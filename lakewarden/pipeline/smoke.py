"""The deploy step's smoke test: a predictor started on a free loopback port, asked for real subjects."""

from __future__ import annotations

import json
import socket
import urllib.request
from typing import Any

from governance.workspace import Workspace


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def smoke_test(ws: Workspace, url: str, model: str, dataset: str, n: int) -> dict[str, Any]:
    """V1 predict requests for real subject tokens of the model's dataset (its silver table, by the
    policy's subject key); every one must answer 200 with a score."""
    import time

    from lakehouse.catalog import Catalog, TableRef

    key = ws.policies.dataset(dataset).subject_key
    tokens = Catalog(ws.config).open(TableRef("silver", dataset)).to_pyarrow_table(columns=[key])
    tokens = [t for t in tokens[key].to_pylist() if t][:n]
    ok, lat = 0, []
    for tok in tokens:
        body = json.dumps({"instances": [{key: tok}]}).encode()
        req = urllib.request.Request(f"{url}/v1/models/{model}:predict", data=body,
                                     headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                out = json.loads(r.read())
                if r.status == 200 and out.get("predictions"):
                    ok += 1
        except (OSError, ValueError):
            pass
        lat.append((time.perf_counter() - t0) * 1000)
    lat.sort()
    return {"requests": len(tokens), "ok": ok, "p50_ms": round(lat[len(lat) // 2], 2) if lat else None}
