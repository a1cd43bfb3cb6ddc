"""Ray, for the parts of Lakewarden that scale out (ingest on Ray, DP training with Ray Train).

* :func:`connect` — Ray, connected to ``$RAY_ADDRESS`` (or a Ray started in this process);
* :func:`check_cluster` — a cluster over several machines must share the lake and the keys;
* :class:`Transit` — row data crossing Ray's object store, sealed under a key-store key;
* :class:`LocalRayCluster` — a cluster of local nodes with token authentication (tests, benchmarks).

See docs/scale-out.md for how a user moves from a laptop to a cluster.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from governance.config import ProjectConfig
from governance.errors import LakewardenError
from governance.keys.pgstore import is_dsn
from governance.objectstore import is_remote


class ClusterError(LakewardenError):
    """The Ray cluster cannot be reached, or cannot share this workspace's lake and keys."""


# -- the cluster ------------------------------------------------------------------------------
def connect(address: str | None = None) -> Any:
    """Ray, connected: to ``address``, else ``$RAY_ADDRESS``, else a Ray started here for this process."""
    try:
        import ray
    except ImportError:
        raise ClusterError("the ray engine needs the ray package: pip install 'lakewarden[scale]'") from None
    if not ray.is_initialized():
        addr = address or os.environ.get("RAY_ADDRESS") or None
        try:
            ray.init(address=addr, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                     configure_logging=False)
        except ConnectionError as exc:
            raise ClusterError(f"no Ray cluster at {addr}: {str(exc).splitlines()[0]}") from None
    return ray


def check_cluster(ray: Any, config: ProjectConfig) -> int:
    """The cluster's CPUs; refuses a cluster spread over machines that cannot share the lake or the keys."""
    hosts = sorted({n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")})
    if len(hosts) > 1:
        root = config.table_uri("x")[:-2]
        if not is_remote(root):
            raise ClusterError(
                f"the Ray cluster spans {len(hosts)} machines, and storage.root is a local folder ({root}): "
                "workers elsewhere cannot write it. Set storage.root to s3://bucket/prefix (docs/scale-out.md)"
            )
        if not is_dsn(config.keys.store):
            raise ClusterError(
                f"the Ray cluster spans {len(hosts)} machines, and keys.store is a local SQLite file: workers "
                "elsewhere would make other keys. Set keys.store to postgresql://user@host:port/db (docs/scale-out.md)"
            )
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


# -- rows in transit ---------------------------------------------------------------------------
TRANSIT_KEY = "ray-transit"


class Transit:
    """Row data crossing Ray's object store, sealed (AES-256-GCM) under a system key of the key
    store, which the driver and every worker open with their own KEK.

    Ray keeps task arguments and results in shared memory and spills them to local disk when
    memory runs short; a landing batch holds plaintext identifiers, and a batch's unique
    columns hold subject ids. Sealed, neither is readable where Ray puts it. Each blob is bound
    (AAD) to this ingest, its batch and its direction, so one cannot stand for another."""

    def __init__(self, key: bytes, ingest_id: str) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = AESGCM(key)
        self.ingest_id = ingest_id

    def _aad(self, batch_id: str, kind: str) -> bytes:
        return f"lakewarden-ray-transit:v1|{self.ingest_id}|{batch_id}|{kind}".encode()

    def seal(self, obj: Any, batch_id: str, kind: str) -> bytes:
        import pickle

        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, pickle.dumps(obj, protocol=5), self._aad(batch_id, kind))

    def open(self, blob: bytes, batch_id: str, kind: str) -> Any:
        import pickle

        # Authenticated first: only bytes sealed under the key store's key are unpickled.
        return pickle.loads(self._aead.decrypt(blob[:12], blob[12:], self._aad(batch_id, kind)))


# -- a local cluster (tests, benchmarks, a laptop trying the ray engine) ---------------------------
class LocalRayCluster:
    """A Ray cluster of ``nodes`` raylets on this machine, on loopback: ``ray start --head`` and
    ``ray start --address`` per extra node, each ``--block``-ed under a process of ours, so
    :meth:`stop` ends exactly these nodes (``ray stop`` would end every Ray on the machine).

    The nodes get ``env`` (this process's environment by default): what a worker needs from its
    machine, such as the object store's credentials, comes from there, as on a real cluster.
    Ray's token authentication is on, with a token made for this cluster (:meth:`client_env`
    gives a driver the address and the token). Ray advertises the machine's own address, never
    loopback, and its servers listen on every interface: the token is what keeps others out."""

    def __init__(self, temp_dir: Path, *, nodes: int = 2, cpus_per_node: int = 1, port: int | None = None,
                 env: dict[str, str] | None = None) -> None:
        from governance.objectstore import free_port

        self.temp_dir = Path(temp_dir)
        self.nodes = nodes
        self.cpus = cpus_per_node
        self.port = port or free_port()
        import secrets

        self.token = secrets.token_hex(32)
        self.env = {**(os.environ if env is None else env), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}
        self.procs: list[Any] = []

    def client_env(self) -> dict[str, str]:
        """What a driver sets to use this cluster (``ray.init()`` and ``--engine ray`` read them)."""
        return {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _ray(self) -> str:
        import shutil
        import sys

        exe = Path(sys.executable).with_name("ray")
        return str(exe) if exe.exists() else (shutil.which("ray") or "ray")

    def start(self, *, timeout: float = 90.0) -> "LocalRayCluster":
        import subprocess

        from governance.objectstore import free_port

        self.temp_dir.mkdir(parents=True, exist_ok=True)
        base = [self._ray(), "start", "--block", f"--num-cpus={self.cpus}",
                "--disable-usage-stats"]
        log = open(self.temp_dir / "ray-start.log", "ab")
        head = base + ["--head", f"--port={self.port}", "--include-dashboard=false", f"--temp-dir={self.temp_dir}",
                       f"--ray-client-server-port={free_port()}"]
        self.procs.append(subprocess.Popen(head, env=self.env, stdout=log, stderr=log, start_new_session=True))
        self._wait(1, timeout)
        for _ in range(self.nodes - 1):
            self.procs.append(subprocess.Popen(base + [f"--address={self.address}"], env=self.env, stdout=log,
                                               stderr=log, start_new_session=True))
        self._wait(self.nodes, timeout)
        return self

    def _wait(self, nodes: int, timeout: float) -> None:
        import subprocess

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                self.stop()
                raise ClusterError(f"a Ray node did not start (see {self.temp_dir / 'ray-start.log'})")
            r = subprocess.run([self._ray(), "status", f"--address={self.address}"], env=self.env,
                               capture_output=True, text=True, timeout=60)
            if r.returncode == 0 and r.stdout.count("node_") >= nodes:
                return
            time.sleep(1.0)
        self.stop()
        raise ClusterError(f"the local Ray cluster did not reach {nodes} node(s) in {timeout:.0f} s")

    def worker_pids(self, name: str = "IngestWorker") -> list[int]:
        """Processes running one of our actors (their title is ``ray::<class>.<method>``)."""
        pids = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    cmd = (d / "cmdline").read_bytes()
                except OSError:
                    continue
                if cmd.startswith(f"ray::{name}".encode()):
                    pids.append(int(d.name))
        return pids

    def stop(self, *, grace: float = 5.0) -> None:
        """SIGTERM to each node's process group; what is left after ``grace`` seconds (a node
        drains for up to 30 s) is killed: a test cluster holds nothing worth draining."""
        import signal

        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in reversed(self.procs):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
                time.sleep(0.2)
        for p in self.procs:
            p.wait(10)
        self.procs.clear()
