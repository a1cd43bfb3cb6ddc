"""What issue #19's security costs the governed predictor: HTTPS, and HTTPS with bearer tokens.

One trained model, three ``lakewarden serve`` processes of the same workspace on loopback, one
worker each, differing only in lakewarden.yaml:

* **plain**: HTTP, auth off (the baseline);
* **https**: ``serving.tls_cert``/``serving.tls_key`` (a loopback certificate of a local CA from
  :mod:`governance.tls`, ECDSA P-256), auth off;
* **https+auth**: the same certificate and ``auth.enabled``: every request carries
  ``Authorization: Bearer <token>``, an RS256 access token minted here with a local key; the
  issuer's discovery document and JWKS are served by a tiny HTTP server on loopback (as
  tests/test_login_audit.py fakes an issuer; an http issuer is accepted on loopback). No Keycloak.

Keep-alive load: ``wrk`` (bench_serving.py's helpers: :func:`bench_serving.load`), V1 requests of
one entity at concurrency 1 and 8 for ``--seconds`` each, ``--rounds`` rounds with the order of the
servers reversed every other round; each mode's throughput and p50/p99 as a ratio to plain HTTP
measured in the same round, the median round reported with every round's ratio (the spread).
wrk speaks TLS but does not verify the server's certificate: fine for a load test (the cost of
verifying a chain is paid once per connection, by the client). The bearer header comes from an
environment variable read by the wrk Lua script, so the token is never written to a file.

New connections: ``--fresh`` requests per mode, each on a new connection (Python's
``http.client``; over HTTPS an ``ssl`` context that trusts the local CA and verifies the
certificate, no session resumption), and the handshake alone (TCP connect vs TCP connect + TLS
handshake, no request): what a client that does not keep connections alive pays.

The results JSON (benchmarks/results/auth.json) holds no token, key or certificate.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import http.client
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import REPO, WRK_LUA, console, free_port, load, prepare, wait, wrk_cpu_share  # noqa: E402

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

MODES = ("plain", "https", "https+auth")
CONCURRENCY = (1, 8)
AUDIENCE = "lakewarden-predictor"
BEARER_ENV = "LW_BENCH_BEARER"  # wrk's Lua script reads the token from here: it is never written to a file
BEARER_LUA = WRK_LUA.replace(
    'wrk.headers["Content-Type"] = "application/json"\n',
    'wrk.headers["Content-Type"] = "application/json"\n'
    f'wrk.headers["Authorization"] = "Bearer " .. assert(os.getenv("{BEARER_ENV}"), "no token")\n')


class _Issuer(BaseHTTPRequestHandler):
    """An OIDC issuer on loopback: the discovery document and the JWKS of one RSA key."""

    server: "LocalIssuer"

    def log_message(self, *a) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802
        s = self.server
        if self.path.endswith("/.well-known/openid-configuration"):
            body = {"issuer": s.issuer, "jwks_uri": f"{s.issuer}/protocol/openid-connect/certs"}
        else:
            body = {"keys": [s.jwk]}
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class LocalIssuer(ThreadingHTTPServer):
    """Mints RS256 access tokens with a key of its own and serves what a verifier fetches."""

    def __init__(self) -> None:
        import jwt
        from cryptography.hazmat.primitives.asymmetric import rsa

        super().__init__(("127.0.0.1", 0), _Issuer)
        self.issuer = f"http://127.0.0.1:{self.server_address[1]}/realms/bench"
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.jwk = {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key())),
                    "kid": "bench-1", "use": "sig", "alg": "RS256"}
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def mint(self, user: str, groups: list[str], *, ttl: float = 7200) -> str:
        import jwt

        now = time.time()
        return jwt.encode({"iss": self.issuer, "aud": [AUDIENCE, "account"], "sub": f"uuid-{user}", "typ": "Bearer",
                           "preferred_username": user, "groups": groups, "iat": int(now) - 5, "exp": int(now + ttl),
                           "jti": f"bench-{int(now)}"}, self.key, algorithm="RS256", headers={"kid": "bench-1"})


def issue_tls(folder: Path) -> tuple[Path, Path, Path]:
    """A local CA and a loopback server certificate: (chain, key 0600, CA file)."""
    from cryptography.hazmat.primitives import serialization

    from governance.tls import LocalCA, write_private

    ca = LocalCA.create("Lakewarden bench CA")
    cert = ca.issue_server()
    folder.mkdir(parents=True, exist_ok=True)
    chain = folder / "server.crt"
    chain.write_bytes(cert.cert_pem)
    key = write_private(folder / "server.key", cert.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return chain, key, ca.write_cert(folder / "ca.pem")


def post(url: str, body: bytes, token: str | None, context: ssl.SSLContext | None) -> tuple[int, dict]:
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=30,
                                    context=context) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {}


def fresh_connections(port: int, body: bytes, n: int, context: ssl.SSLContext | None, token: str | None,
                      model: str = "credit") -> dict:
    """``n`` V1 requests, each on a new connection; and ``n`` bare handshakes (TCP, or TCP + TLS)."""
    headers = {"content-type": "application/json", "connection": "close"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        conn = (http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=context) if context
                else http.client.HTTPConnection("127.0.0.1", port, timeout=30))
        conn.request("POST", f"/v1/models/{model}:predict", body=body, headers=headers)
        r = conn.getresponse()
        r.read()
        conn.close()
        times.append(time.perf_counter() - t0)
        if r.status != 200:
            raise SystemExit(f"a fresh-connection request got HTTP {r.status}")
    hs, proto = [], None
    for _ in range(n):
        t0 = time.perf_counter()
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        if context:
            s = context.wrap_socket(s, server_hostname="127.0.0.1")  # the full handshake, certificate verified
            proto = proto or f"{s.version()} {s.cipher()[0]}"
        hs.append(time.perf_counter() - t0)
        s.close()
    return {"request_median_ms": statistics.median(times) * 1e3, "request_mean_ms": statistics.fmean(times) * 1e3,
            "connect_median_ms": statistics.median(hs) * 1e3, "protocol": proto or "TCP"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fresh", type=int, default=200, help="requests on new connections per mode and round")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "auth.json")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: run `make bench-deps` (Debian's wrk package)")

    root = Path(tempfile.mkdtemp(prefix="lw-bench-auth-"))
    issuer = LocalIssuer()
    procs: dict[str, subprocess.Popen] = {}
    rounds: list[dict] = []
    wrk_share: dict[str, float] = {}
    try:
        config, out, subject = prepare(root)
        chain, key, ca_file = issue_tls(root / "tls")
        tls_yaml = f"serving: {{tls_cert: '{chain}', tls_key: '{key}', tls_ca: '{ca_file}'}}\n"
        auth_yaml = f"auth: {{enabled: true, issuer: '{issuer.issuer}', audience: {AUDIENCE}}}\n"
        base = config.read_text()
        configs = {"plain": config, "https": root / "https.yaml", "https+auth": root / "auth.yaml"}
        configs["https"].write_text(base + tls_yaml)
        configs["https+auth"].write_text(base + tls_yaml + auth_yaml)
        ports = {m: free_port() for m in MODES}
        for m in MODES:
            env = {**os.environ, "LAKEWARDEN_CONFIG": str(configs[m]), "LAKEWARDEN_USER": "mel", "PYTHONPATH": str(REPO)}
            with open(root / f"{m}.log", "wb") as log:
                procs[m] = subprocess.Popen([sys.executable, "-m", "lakewarden", "serve", "--model", str(out.ref),
                                             "--port", str(ports[m])], env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        ctx = ssl.create_default_context(cafile=str(ca_file))  # Python's clients verify; wrk does not
        contexts = {"plain": None, "https": ctx, "https+auth": ctx}
        base_url = {m: f"{'https' if contexts[m] else 'http'}://127.0.0.1:{ports[m]}" for m in MODES}
        with console.status("starting three predictors"):
            for m in MODES:
                try:
                    wait(f"{base_url[m]}/v2/models/credit/ready", context=contexts[m])
                except SystemExit:
                    console.print((root / f"{m}.log").read_text()[-3000:])
                    raise
        bearer = issuer.mint("mel", ["ml_engineer"])
        tokens = {"plain": None, "https": None, "https+auth": bearer}
        body = json.dumps({"instances": [subject]}).encode()
        urls = {m: f"{base_url[m]}/v1/models/credit:predict" for m in MODES}
        for m in MODES:  # each answers 200 with a score; auth is really enforced
            code, ans = post(urls[m], body, tokens[m], contexts[m])
            assert code == 200 and ans["predictions"], (m, code, ans)
        assert post(urls["https+auth"], body, None, ctx)[0] == 401, "auth is not enforced"
        assert post(urls["https+auth"], body, "x.y.z", ctx)[0] == 401, "a malformed token was accepted"
        os.environ[BEARER_ENV] = bearer  # for wrk (it inherits the environment), never in a file
        scripts = {"plain": root / "post.lua", "https": root / "post.lua", "https+auth": root / "bearer.lua"}
        scripts["plain"].write_text(WRK_LUA % json.dumps(body.decode()))
        scripts["https+auth"].write_text(BEARER_LUA % json.dumps(body.decode()))
        with console.status("warming up"):
            for m in MODES:
                for conc in CONCURRENCY:
                    r = load(urls[m], scripts[m], conc, 2, procs[m].pid)
                    assert r["errors"] == 0 and r["requests"] > 0, (m, conc, r)
                wrk_share[m] = wrk_cpu_share(urls[m], scripts[m], 8, 3)
        for rnd in range(args.rounds):
            order = list(MODES) if rnd % 2 == 0 else list(reversed(MODES))
            row: dict = {"round": rnd + 1, "order": order, "load": {}, "fresh": {}}
            for conc in CONCURRENCY:
                cell: dict = {}
                for m in order:
                    with console.status(f"round {rnd + 1}/{args.rounds}: {m}, concurrency {conc}"):
                        cell[m] = load(urls[m], scripts[m], conc, args.seconds, procs[m].pid)
                    if cell[m]["errors"]:
                        raise SystemExit(f"{m} at concurrency {conc}: {cell[m]['errors']} errors")
                for m in MODES[1:]:
                    cell[m]["rps_vs_plain"] = cell[m]["rps"] / cell["plain"]["rps"]
                    cell[m]["p50_vs_plain"] = cell[m]["p50_ms"] / cell["plain"]["p50_ms"]
                    cell[m]["p99_vs_plain"] = cell[m]["p99_ms"] / cell["plain"]["p99_ms"]
                row["load"][str(conc)] = cell
            for m in order:
                with console.status(f"round {rnd + 1}/{args.rounds}: {m}, {args.fresh} new connections"):
                    row["fresh"][m] = fresh_connections(ports[m], body, args.fresh, contexts[m], tokens[m])
            for m in MODES[1:]:
                f, p = row["fresh"][m], row["fresh"]["plain"]
                f["request_vs_plain"] = f["request_median_ms"] / p["request_median_ms"]
                f["extra_ms"] = f["request_median_ms"] - p["request_median_ms"]
                f["connect_extra_ms"] = f["connect_median_ms"] - p["connect_median_ms"]
            rounds.append(row)
        for m in MODES:
            assert procs[m].poll() is None, f"{m} server exited"
    finally:
        os.environ.pop(BEARER_ENV, None)
        for p in procs.values():
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        issuer.shutdown()
        shutil.rmtree(root, ignore_errors=True)

    def median_round(items: list[dict], key: str) -> dict:
        return sorted(items, key=lambda x: x[key])[len(items) // 2]

    results = []
    for conc in CONCURRENCY:
        per = [r["load"][str(conc)] for r in rounds]
        entry: dict = {"concurrency": conc, "plain": median_round([c["plain"] for c in per], "rps")}
        for m in MODES[1:]:
            cells = [c[m] for c in per]
            entry[m] = {**median_round(cells, "rps_vs_plain"),
                        "rps_vs_plain_rounds": [c["rps_vs_plain"] for c in cells],
                        "p50_vs_plain_median": statistics.median(c["p50_vs_plain"] for c in cells),
                        "p99_vs_plain_median": statistics.median(c["p99_vs_plain"] for c in cells),
                        "p50_vs_plain_rounds": [c["p50_vs_plain"] for c in cells],
                        "p99_vs_plain_rounds": [c["p99_vs_plain"] for c in cells]}
        results.append(entry)
    fresh: dict = {}
    for m in MODES:
        cells = [r["fresh"][m] for r in rounds]
        fresh[m] = {"request_median_ms": statistics.median(c["request_median_ms"] for c in cells),
                    "connect_median_ms": statistics.median(c["connect_median_ms"] for c in cells),
                    "protocol": cells[0]["protocol"]}
        if m != "plain":
            fresh[m] |= {"request_vs_plain": statistics.median(c["request_vs_plain"] for c in cells),
                         "request_vs_plain_rounds": [c["request_vs_plain"] for c in cells],
                         "extra_ms": statistics.median(c["extra_ms"] for c in cells),
                         "connect_extra_ms": statistics.median(c["connect_extra_ms"] for c in cells),
                         "connect_extra_ms_rounds": [c["connect_extra_ms"] for c in cells]}

    t = Table(title=f"V1 predict, one entity, keep-alive, loopback, wrk, {os.cpu_count()} CPUs "
                    f"({args.seconds:g} s per case, median round of {args.rounds}, ratios to plain HTTP of the same round)")
    for c in ("conc.", "mode", "rps*", "p50 / p99 ms*", "rps / plain", "each round", "p50 / plain†", "p99 / plain†",
              "server CPU*", "wrk CPU (c8)"):
        t.add_column(c, justify="right")
    for e in results:
        for m in MODES:
            r = e[m]
            ratio = ("1 (baseline)", "", "", "") if m == "plain" else (
                f"{r['rps_vs_plain']:.2f}", ", ".join(f"{x:.2f}" for x in r["rps_vs_plain_rounds"]),
                f"{r['p50_vs_plain_median']:.2f}", f"{r['p99_vs_plain_median']:.2f}")
            t.add_row(str(e["concurrency"]) if m == "plain" else "", m, f"{r['rps']:.0f}",
                      f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f}", *ratio, f"{r['server_cpu_share']:.0%}",
                      f"{wrk_share[m]:.1%}")
    wide = Console(width=max(console.width, 160))
    wide.print(t)
    wide.print("* absolute figures of each mode's median round (they move with the machine's load; the ratios are to plain HTTP in the same round); † median of the rounds' ratios")
    t2 = Table(title=f"A new connection per request ({args.fresh} per mode and round, Python http.client; "
                     "median of the rounds' medians)")
    for c in ("mode", "protocol", "request ms", "/ plain", "each round", "+ ms", "connect ms", "handshake + ms"):
        t2.add_column(c, justify="right")
    for m in MODES:
        f = fresh[m]
        extra = ("", "", "", "") if m == "plain" else (
            f"{f['request_vs_plain']:.2f}", ", ".join(f"{x:.2f}" for x in f["request_vs_plain_rounds"]),
            f"{f['extra_ms']:+.2f}", f"{f['connect_extra_ms']:+.2f}")
        t2.add_row(m, f["protocol"], f"{f['request_median_ms']:.2f}", *extra[:3], f"{f['connect_median_ms']:.3f}",
                   extra[3])
    wide.print(t2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "cpus": os.cpu_count(), "issue": 19, "load_generator": "wrk 4.1.0 (Debian); TLS without certificate verification",
        "modes": {"plain": "HTTP, auth off", "https": "HTTPS (local CA, ECDSA P-256 server key), auth off",
                  "https+auth": "HTTPS + Authorization: Bearer (RS256, 2048-bit key, local issuer on loopback)"},
        "seconds": args.seconds, "rounds": args.rounds, "fresh_requests": args.fresh,
        "results": results, "fresh_connections": fresh, "wrk_cpu_share_c8": wrk_share, "all_rounds": rounds,
    }, indent=2) + "\n")
    console.print(f"written to {args.out}")


if __name__ == "__main__":
    main()
