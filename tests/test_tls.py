"""governance/tls.py: a local CA, server certificates, and private files that never land in git.

The handshake test is real TLS on loopback (Python's ssl on both ends), no server install needed.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from governance.tls import LocalCA, TlsError, write_private

T0 = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_the_server_pem_holds_the_key_then_the_chain_and_is_private(tmp_path: Path):
    ca = LocalCA.create("test CA", clock=lambda: T0)
    cert = ca.issue_server(["127.0.0.1", "::1", "localhost"])
    pem = cert.write_pem(tmp_path / "tls" / "server.pem")
    assert _mode(pem) == 0o600 and _mode(pem.parent) == 0o700
    text = pem.read_bytes()
    assert text.startswith(b"-----BEGIN PRIVATE KEY-----") and text.count(b"BEGIN CERTIFICATE") == 2
    leaf, root = x509.load_pem_x509_certificates(text)
    assert root == ca.cert and leaf.issuer == ca.cert.subject
    leaf.verify_directly_issued_by(ca.cert)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert leaf.not_valid_before_utc == T0 - dt.timedelta(minutes=5)
    assert leaf.not_valid_after_utc == T0 + dt.timedelta(days=7)
    assert load_pem_private_key(text, None).public_key() == leaf.public_key()
    ca_file = ca.write_cert(tmp_path / "ca.pem")
    assert b"PRIVATE" not in ca_file.read_bytes()


def test_a_client_that_trusts_the_ca_completes_a_handshake_and_one_that_does_not_is_refused(tmp_path: Path):
    ca = LocalCA.create()
    pem = ca.issue_server().write_pem(tmp_path / "server.pem")
    ca_file = ca.write_cert(tmp_path / "ca.pem")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pem)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        for _ in range(2):
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as s:
                    s.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    trusting = ssl.create_default_context(cafile=str(ca_file))
    with socket.create_connection(("127.0.0.1", port)) as raw, trusting.wrap_socket(raw, server_hostname="localhost") as s:
        assert s.recv(2) == b"ok"
    stranger = ssl.create_default_context()  # the system's CAs only
    stranger.load_verify_locations(cadata=LocalCA.create().cert_pem.decode())  # and another local CA
    with pytest.raises(ssl.SSLCertVerificationError):
        with socket.create_connection(("127.0.0.1", port)) as raw, stranger.wrap_socket(raw, server_hostname="localhost"):
            pass
    t.join(5)
    listener.close()


def test_a_private_file_is_refused_inside_a_git_work_tree_unless_git_ignores_it(tmp_path: Path):
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text("/.lakewarden/\n")
    with pytest.raises(TlsError, match="git work tree"):
        write_private(repo / "tls" / "server.pem", b"key")
    assert not (repo / "tls" / "server.pem").exists()
    ok = write_private(repo / ".lakewarden" / "tls" / "server.pem", b"key")
    assert ok.read_bytes() == b"key" and _mode(ok) == 0o600


def test_a_saved_ca_issues_again_and_callers_mistakes_are_value_errors(tmp_path: Path):
    ca = LocalCA.create(clock=lambda: T0, valid=dt.timedelta(days=2))
    ca.save(tmp_path / "ca.key", tmp_path / "ca.pem")
    assert _mode(tmp_path / "ca.key") == 0o600
    again = LocalCA.load(tmp_path / "ca.key", tmp_path / "ca.pem", clock=lambda: T0)
    leaf = again.issue_server(["db.internal"], valid=dt.timedelta(days=30)).cert
    leaf.verify_directly_issued_by(ca.cert)
    assert leaf.not_valid_after_utc == ca.cert.not_valid_after_utc  # never outlives its CA
    with pytest.raises(ValueError):
        ca.issue_server([])
    with pytest.raises(ValueError):
        LocalCA.create(valid=dt.timedelta(0))


def test_a_trino_session_keeps_its_ca_when_the_environment_names_another(monkeypatch: pytest.MonkeyPatch):
    """requests lets REQUESTS_CA_BUNDLE replace a session's verify; the Trino client's session must not."""
    import requests

    from lakehouse.trino import http_session

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    plain = requests.Session()
    plain.verify = "/srv/lakewarden/ca.pem"
    assert plain.merge_environment_settings("https://127.0.0.1:8443/v1/statement", {}, None, None, None)["verify"] \
        == "/etc/ssl/certs/ca-certificates.crt"  # the pitfall itself
    ours = http_session("/srv/lakewarden/ca.pem")
    assert ours.merge_environment_settings("https://127.0.0.1:8443/v1/statement", {}, None, None, None)["verify"] \
        == "/srv/lakewarden/ca.pem"
