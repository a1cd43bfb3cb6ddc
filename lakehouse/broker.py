"""A local Apache Kafka broker in KRaft mode (no ZooKeeper), for the laptop profile and the tests.

The broker comes from Maven Central jars (``infra/kafka/install.sh``, cached outside git) and
runs on the machine's Java, bound to loopback, as one combined broker and controller. Its data
folder is a workspace folder, so the erasure scanner reads (and decodes) its log segments.

    broker = LocalBroker(Path(".lakewarden/kafka"), port=9092)
    broker.start()          # formats the folder on first use; returns when the port answers
    ...
    broker.stop()

Production points ``streaming.bootstrap_servers`` at the organisation's own brokers instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

from governance.errors import LakewardenError

REPO = Path(__file__).resolve().parents[1]
INSTALL = REPO / "infra" / "kafka" / "install.sh"


class BrokerError(LakewardenError):
    """The local broker could not be installed, started or stopped."""


def install() -> Path:
    """Install (once per machine) and return the Kafka home with ``libs/``."""
    cached = os.environ.get("LAKEWARDEN_KAFKA_HOME")
    if cached and (Path(cached) / "libs").is_dir():
        return Path(cached)
    try:
        out = subprocess.run(["bash", str(INSTALL)], check=True, capture_output=True, text=True, timeout=900)
    except subprocess.CalledProcessError as exc:
        raise BrokerError(f"installing Kafka failed: {exc.stderr.strip()[-500:]}") from None
    except FileNotFoundError:
        raise BrokerError("bash is needed to install Kafka (infra/kafka/install.sh)") from None
    return Path(out.stdout.strip().splitlines()[-1])


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def free_port(*, pair: bool = False) -> int:
    """A free loopback port (``pair``: and the next one too, for the broker's controller)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not pair or (port < 65535 and not _port_open(port + 1) and _bindable(port + 1)):
            return port
    raise BrokerError("no free pair of loopback ports")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class LocalBroker:
    """One KRaft broker+controller on 127.0.0.1:``port`` (controller on ``port + 1``)."""

    def __init__(self, data_dir: Path, *, port: int = 9092, heap_mb: int = 512) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.heap_mb = heap_mb
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_dir(self) -> Path:
        """Where the broker keeps its topic partitions (``<topic>-<n>/<offset>.log`` segments)."""
        return self.data_dir / "logs"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "broker.pid"

    def _properties(self) -> Path:
        p = self.data_dir / "server.properties"
        c = self.port + 1
        p.write_text(
            "\n".join([
                "process.roles=broker,controller",
                "node.id=1",
                f"controller.quorum.voters=1@127.0.0.1:{c}",
                f"listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{c}",
                f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
                "controller.listener.names=CONTROLLER",
                "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                f"log.dirs={self.log_dir}",
                "num.partitions=1",
                "offsets.topic.replication.factor=1",
                "offsets.topic.num.partitions=4",
                "transaction.state.log.replication.factor=1",
                "transaction.state.log.min.isr=1",
                "transaction.state.log.num.partitions=4",
                "group.initial.rebalance.delay.ms=0",
                "auto.create.topics.enable=false",
                "log.retention.hours=168",
                "",
            ])
        )
        return p

    def _java(self, home: Path, main: str, *args: str, heap: bool = False) -> list[str]:
        java = shutil.which("java")
        if java is None:
            raise BrokerError("java (17+) is needed to run the local Kafka broker")
        opts = [f"-Xmx{self.heap_mb}m", f"-Xms{min(self.heap_mb, 256)}m", "-XX:+UseG1GC"] if heap else ["-Xmx256m"]
        return [java, *opts, "-Dlog4j2.configurationFile=" + str(home / "log4j2.properties"),
                "-cp", str(home / "libs") + "/*", main, *args]

    def start(self, *, timeout: float = 90.0) -> "LocalBroker":
        """Format the folder on first use, start the broker, wait until it takes connections."""
        if _port_open(self.port):
            raise BrokerError(f"port {self.port} is already in use (another broker?)")
        home = install()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        props = self._properties()
        if not (self.log_dir / "meta.properties").exists():
            cluster = uuid.uuid4().bytes
            import base64

            cid = base64.urlsafe_b64encode(cluster).decode().rstrip("=")
            r = subprocess.run(self._java(home, "kafka.tools.StorageTool", "format", "-t", cid, "-c", str(props)),
                               capture_output=True, text=True, timeout=120)
            if r.returncode != 0:
                raise BrokerError(f"formatting {self.log_dir} failed: {(r.stderr or r.stdout).strip()[-500:]}")
        log = open(self.data_dir / "broker.log", "ab")
        self.proc = subprocess.Popen(self._java(home, "kafka.Kafka", str(props), heap=True), stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.pid_file.write_text(str(self.proc.pid))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.data_dir / "broker.log").read_text(errors="replace")[-800:]
                raise BrokerError(f"the broker exited (code {self.proc.returncode}): {tail}")
            if _port_open(self.port) and self._ready():
                return self
            time.sleep(0.25)
        self.stop()
        raise BrokerError(f"the broker did not answer on port {self.port} within {timeout:.0f}s")

    def _ready(self) -> bool:
        from confluent_kafka.admin import AdminClient

        try:
            md = AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(timeout=2)
            return bool(md.brokers)
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def stop(self, *, timeout: float = 30.0) -> None:
        """Stop the broker this object started, or the one its pid file names."""
        pid = self.proc.pid if self.proc is not None else None
        if pid is None and self.pid_file.exists():
            try:
                pid = int(self.pid_file.read_text().strip())
            except ValueError:
                pid = None
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None:
                if self.proc.poll() is not None:
                    break
            else:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
            time.sleep(0.2)
        else:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.proc = None
        self.pid_file.unlink(missing_ok=True)


def create_topic(bootstrap: str, topic: str, *, partitions: int = 1, config: dict[str, str] | None = None,
                 timeout: float = 30.0) -> None:
    """Create ``topic`` (an existing one is left as it is)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    fut = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1, config=config or {})],
                              operation_timeout=timeout)[topic]
    try:
        fut.result(timeout=timeout)
    except KafkaException as exc:
        if "TOPIC_ALREADY_EXISTS" not in str(exc):
            raise BrokerError(f"could not create topic {topic!r} on {bootstrap}: {exc}") from None
    except TimeoutError:  # concurrent.futures.TimeoutError is TimeoutError since Python 3.11
        raise BrokerError(f"could not create topic {topic!r}: no broker answered at {bootstrap} "
                          f"within {timeout:g}s") from None


__all__ = ["BrokerError", "LocalBroker", "create_topic", "free_port", "install"]
