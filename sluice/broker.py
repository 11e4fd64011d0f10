"""Run a real single-node Apache Kafka (KRaft) for dev boxes and tests.

Kafka comes from Maven Central jars (``kafka/pom.xml``) rather than a tarball
or a container, because Maven Central is the only Kafka source every project
machine can reach.  Stdlib only, so it works before the venv is complete.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = ["BrokerError", "LocalBroker", "kafka_classpath", "port_in_use"]

_HOST = "127.0.0.1"
#: JVM flags for a tiny single-node dev broker that shares 2 vCPUs with llama.cpp.
#: Serial GC: no concurrent GC threads; a dev broker's young collections of a
#: small heap take milliseconds. C1 only (TieredStopAtLevel=1): C2 recompiling
#: Kafka's hot paths cost seconds of CPU in every short-lived test broker, and at
#: dev request rates C1 code is fast enough. The heap starts small and grows to
#: `heap`. Startup CPU 9.5 -> 4.9 s (with the thread settings in _write_config).
#: A production cluster is not started by this module; size its JVM as usual.
_JVM_FLAGS = (
    "-Xms64m",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-XX:+ExitOnOutOfMemoryError",
)
_NODE_ID = 1
_LOG_TAIL_LINES = 40


class BrokerError(RuntimeError):
    """Raised when the local broker cannot be built, started, probed or stopped."""


def _require_tool(name: str, hint: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise BrokerError(f"{name} not found on PATH: {hint}")
    return found


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """Last lines of a log, so errors carry their own diagnosis."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def _classpath_is_fresh(cache: Path, pom: Path) -> bool:
    """A cache is stale when the pom changed or ~/.m2 lost a jar."""
    try:
        if cache.stat().st_mtime < pom.stat().st_mtime:
            return False
        entries = cache.read_text(encoding="utf-8").strip()
    except OSError:
        return False
    if not entries:
        return False
    return all(Path(jar).is_file() for jar in entries.split(os.pathsep))


def kafka_classpath(repo_root: Path, state_dir: Path) -> str:
    """Resolve the broker classpath via Maven, cached in ``state_dir``.

    Maven is slow to start (seconds), so the answer is cached and only
    recomputed when ``kafka/pom.xml`` is newer or a jar vanished.
    """
    _require_tool("java", "install Java 17+")
    mvn = _require_tool("mvn", "install Maven")
    pom = (repo_root / "kafka" / "pom.xml").resolve()
    if not pom.is_file():
        raise BrokerError(f"Kafka pom not found at {pom}")
    cache = state_dir / "kafka" / "classpath.txt"
    if _classpath_is_fresh(cache, pom):
        return cache.read_text(encoding="utf-8").strip()

    cache.parent.mkdir(parents=True, exist_ok=True)
    log = state_dir / "logs" / "maven.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temp name first so a killed run never leaves a half cache.
    tmp = cache.with_name(f"classpath.{os.getpid()}.tmp")
    cmd = [
        mvn,
        "-q",
        "-B",
        "-f",
        str(pom),
        "dependency:build-classpath",
        f"-Dmdep.outputFile={tmp.resolve()}",
    ]
    with log.open("wb") as out:
        rc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        ).returncode
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise BrokerError(
            f"maven could not resolve the Kafka classpath (exit {rc}); log {log}:\n{_tail(log)}"
        )
    os.replace(tmp, cache)
    classpath = cache.read_text(encoding="utf-8").strip()
    if not classpath:
        raise BrokerError(f"maven produced an empty classpath; log {log}")
    return classpath


def port_in_use(port: int) -> bool:
    """True if something already listens on 127.0.0.1:port.

    SO_REUSEADDR mirrors what the JVM sets, so a port in TIME_WAIT after a
    broker restart is not mistaken for a conflict.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_HOST, port))
        except OSError:
            return True
    return False


def _new_cluster_id() -> str:
    """Same shape as Kafka's ``Uuid.randomUuid()``: 22 url-safe base64 chars."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):  # Kafka avoids ids that look like CLI flags
            return cid


def _pid_alive(pid: int, marker: str) -> bool:
    """Alive, not a zombie, and really our broker (pids get reused)."""
    proc = Path("/proc") / str(pid)
    if Path("/proc/self").exists():
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return False
        state = stat.rsplit(")", 1)[-1].split()[0]
        return state not in ("Z", "X") and "kafka.Kafka" in cmdline and marker in cmdline
    try:  # no /proc (macOS): best effort
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- a hand-written Kafka protocol probe -------------------------------------
# A TCP connect succeeds long before the broker can serve clients; only a real
# request proves readiness, and this avoids needing a Kafka client library.

_API_METADATA = 3
_API_VERSIONS = 18


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        buf += chunk
    return bytes(buf)


def _request(sock: socket.socket, api_key: int, version: int, corr: int, body: bytes) -> bytes:
    """Request header v1 / response header v0 (valid for the calls below)."""
    client_id = b"sluice-probe"
    header = struct.pack(">hhih", api_key, version, corr, len(client_id)) + client_id
    payload = header + body
    sock.sendall(struct.pack(">i", len(payload)) + payload)
    (size,) = struct.unpack(">i", _recv_exact(sock, 4))
    response = _recv_exact(sock, size)
    (got,) = struct.unpack(">i", response[:4])
    if got != corr:
        raise ConnectionError(f"correlation id mismatch: {got} != {corr}")
    return response[4:]


def _probe(port: int, timeout: float) -> bool:
    """True once the broker serves requests and lists itself as alive."""
    with socket.create_connection((_HOST, port), timeout=timeout) as sock:
        data = _request(sock, _API_VERSIONS, 0, 1, b"")
        error, count = struct.unpack(">hi", data[:6])
        if error != 0:
            return False
        ranges: dict[int, tuple[int, int]] = {}
        for i in range(count):
            key, lo, hi = struct.unpack(">hhh", data[6 + 6 * i : 12 + 6 * i])
            ranges[key] = (lo, hi)
        lo, hi = ranges.get(_API_METADATA, (0, -1))
        if not lo <= 4 <= hi:
            return True  # cannot ask more on this version; serving is enough
        # Metadata v4, no topics, no auto-create: brokers[] holds only
        # registered, unfenced brokers, i.e. ones clients can actually use.
        data = _request(sock, _API_METADATA, 4, 2, struct.pack(">ib", 0, 0))
        _throttle, brokers = struct.unpack(">ii", data[:8])
        offset = 8
        for _ in range(brokers):
            (node_id,) = struct.unpack(">i", data[offset : offset + 4])
            if node_id == _NODE_ID:
                return True
            (host_len,) = struct.unpack(">h", data[offset + 4 : offset + 6])
            offset += 6 + host_len + 4
            (rack_len,) = struct.unpack(">h", data[offset : offset + 2])
            offset += 2 + max(rack_len, 0)
        return False


@dataclass(frozen=True)
class ListenerSecurity:
    """An SSL or SASL_SSL client listener, so Kafka security can be tested against a real broker.

    Clients get only this listener; the broker keeps a PLAINTEXT listener on loopback
    (`internal_port`) for itself (inter-broker traffic, transaction markers) and for the
    readiness probe, which speaks no TLS. SASL users log in with PLAIN or SCRAM-SHA-256/512
    (SCRAM credentials are written at storage format, so they exist on a fresh state dir).
    """

    protocol: Literal["SSL", "SASL_SSL"]
    # PEM: the broker's private key (unencrypted PKCS#8) and certificate chain.
    key_file: Path
    cert_file: Path
    internal_port: int
    users: Mapping[str, str] = field(default_factory=dict)
    # PEM CA of client certificates: given, clients must present one (mutual TLS).
    client_ca_file: Path | None = None


def _jaas_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


_SCRAM = ("SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass
class LocalBroker:
    """One KRaft node (broker+controller) whose whole state lives in ``state_dir``.

    Data and the cluster id survive ``stop``/``start``, so a dev box keeps its
    topics; delete ``state_dir`` for a clean cluster.
    """

    repo_root: Path
    state_dir: Path
    port: int = 9092
    controller_port: int = 9093
    heap: str = "512m"
    # None: one PLAINTEXT listener on `port`. Otherwise `port` speaks SSL / SASL_SSL.
    security: ListenerSecurity | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def bootstrap(self) -> str:
        return f"{_HOST}:{self.port}"

    @property
    def probe_port(self) -> int:
        """Where the plaintext readiness probe connects."""
        return self.security.internal_port if self.security else self.port

    @property
    def kafka_dir(self) -> Path:
        return self.state_dir / "kafka"

    @property
    def data_dir(self) -> Path:
        return self.kafka_dir / "data"

    @property
    def config_path(self) -> Path:
        return self.kafka_dir / "server.properties"

    @property
    def pid_path(self) -> Path:
        return self.kafka_dir / "broker.pid"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "logs" / "kafka.log"

    def _read_pid(self) -> int | None:
        try:
            return int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None

    def _reap(self) -> None:
        """Collect our own exited child so it does not linger as a zombie."""
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None

    def is_running(self) -> bool:
        self._reap()
        pid = self._read_pid()
        return pid is not None and _pid_alive(pid, str(self.config_path.resolve()))

    def _child_alive(self) -> bool:
        """Our own child broker has not exited (known for sure, unlike the /proc check)."""
        return self._proc is not None and self._proc.poll() is None

    def _write_config(self) -> None:
        # Replication factors of 1 and tiny internal topics: a single dev node
        # cannot satisfy the production defaults and 50-partition topics make
        # the first consumer group / transaction slow to appear.
        settings = {
            "process.roles": "broker,controller",
            "node.id": str(_NODE_ID),
            "controller.quorum.voters": f"{_NODE_ID}@{_HOST}:{self.controller_port}",
            "listeners": (f"PLAINTEXT://{_HOST}:{self.port},CONTROLLER://{_HOST}:{self.controller_port}"),
            "advertised.listeners": f"PLAINTEXT://{_HOST}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": self.data_dir.resolve().as_posix(),
            "num.partitions": "1",
            "default.replication.factor": "1",
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "share.coordinator.state.topic.num.partitions": "4",
            "group.initial.rebalance.delay.ms": "0",
            "log.retention.hours": "168",
            "log.segment.bytes": str(64 * 1024 * 1024),
            # A dev node serves a handful of clients on a 2-vCPU box where llama.cpp
            # wants both cores: fewer threads, and the controller's no-op metadata
            # record (which every broker fetch then carries) every 5 s, not 0.5 s.
            # Idle broker CPU fell from 0.045 to 0.018 CPU-s per second with these
            # and _JVM_FLAGS (no clients, loaded machine; docs/operations.md).
            "num.network.threads": "1",
            "num.io.threads": "2",
            "background.threads": "2",
            "metadata.max.idle.interval.ms": "5000",
        }
        if self.security is not None:
            settings.update(self._secure_listener(self.security))
        lines = ["# Generated by sluice.broker on every start; edits are lost."]
        lines += [f"{key}={value}" for key, value in settings.items()]
        self.config_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def _secure_listener(self, sec: ListenerSecurity) -> dict[str, str]:
        """Properties that make `port` the CLIENTS listener speaking `sec.protocol`."""
        pem = self.kafka_dir / "clients-keystore.pem"  # Kafka's PEM keystore: key, then chain
        pem.write_text(sec.key_file.read_text() + sec.cert_file.read_text(), encoding="utf-8")
        pem.chmod(0o600)
        prefix = "listener.name.clients."
        props = {
            "listeners": (
                f"CLIENTS://{_HOST}:{self.port},INTERNAL://{_HOST}:{sec.internal_port},"
                f"CONTROLLER://{_HOST}:{self.controller_port}"
            ),
            "advertised.listeners": f"CLIENTS://{_HOST}:{self.port},INTERNAL://{_HOST}:{sec.internal_port}",
            "inter.broker.listener.name": "INTERNAL",
            "listener.security.protocol.map": (
                f"CLIENTS:{sec.protocol},INTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT"
            ),
            prefix + "ssl.keystore.type": "PEM",
            prefix + "ssl.keystore.location": pem.resolve().as_posix(),
        }
        if sec.client_ca_file is not None:
            props[prefix + "ssl.client.auth"] = "required"
            props[prefix + "ssl.truststore.type"] = "PEM"
            props[prefix + "ssl.truststore.location"] = sec.client_ca_file.resolve().as_posix()
        if sec.protocol == "SASL_SSL":
            users = " ".join(f"user_{name}={_jaas_quote(pw)}" for name, pw in sec.users.items())
            props[prefix + "sasl.enabled.mechanisms"] = ",".join(("PLAIN", *_SCRAM))
            props[prefix + "plain.sasl.jaas.config"] = (
                f"org.apache.kafka.common.security.plain.PlainLoginModule required {users};"
            )
            for mechanism in _SCRAM:
                props[prefix + f"{mechanism.lower()}.sasl.jaas.config"] = (
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;"
                )
        return props

    def _scram_args(self) -> list[str]:
        """StorageTool arguments that create every SASL user for both SCRAM mechanisms."""
        if self.security is None or self.security.protocol != "SASL_SSL":
            return []
        args: list[str] = []
        for name, password in self.security.users.items():
            for mechanism in _SCRAM:
                # StorageTool splits on ',' and '=': keep such characters out of test passwords.
                args += ["--add-scram", f"{mechanism}=[name={name},password={password}]"]
        return args

    def _jvm_args(self, classpath: str) -> list[str]:
        log4j = (self.repo_root / "kafka" / "log4j2.yaml").resolve()
        return [
            "-cp",
            classpath,
            f"-Dlog4j2.configurationFile={log4j}",
            "-Djava.awt.headless=true",
        ]

    def _format_storage(self, classpath: str) -> None:
        """Format once; meta.properties marks a formatted dir so restarts keep data."""
        if (self.data_dir / "meta.properties").is_file():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.state_dir / "logs" / "kafka-format.log"
        cmd = [
            "java",
            *self._jvm_args(classpath),
            "kafka.tools.StorageTool",
            "format",
            "-t",
            _new_cluster_id(),
            "-c",
            str(self.config_path),
            *self._scram_args(),
        ]
        with log.open("wb") as out:
            rc = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
            ).returncode
        if rc != 0:
            raise BrokerError(f"kafka storage format failed (exit {rc}); log {log}:\n{_tail(log)}")

    def start(self) -> None:
        """Launch the broker detached; a no-op if this state dir's broker runs."""
        if self.is_running():
            return
        ports = (self.port, self.controller_port, *((self.security.internal_port,) if self.security else ()))
        for p in ports:
            if port_in_use(p):
                raise BrokerError(
                    f"port {p} on {_HOST} is already in use (another Kafka?); stop it or choose other ports"
                )
        classpath = kafka_classpath(self.repo_root, self.state_dir)
        self.kafka_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._write_config()
        self._format_storage(classpath)
        if self.log_path.exists():  # keep the previous run for post-mortems
            os.replace(self.log_path, self.log_path.with_suffix(".log.1"))
        cmd = [
            "java",
            f"-Xmx{self.heap}",
            *_JVM_FLAGS,
            *self._jvm_args(classpath),
            "kafka.Kafka",
            str(self.config_path.resolve()),
        ]
        with self.log_path.open("wb") as out:
            # Own session: the broker outlives this Python process and a
            # Ctrl-C in the caller's terminal does not reach it.
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid_path.write_text(f"{self._proc.pid}\n", encoding="utf-8")

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the broker serves Kafka requests as a registered node."""
        deadline = time.monotonic() + timeout
        while True:
            exit_code = self._proc.poll() if self._proc is not None else None
            if exit_code is not None or (self._proc is None and not self.is_running()):
                code = "" if exit_code is None else f" (exit {exit_code})"
                raise BrokerError(
                    f"kafka broker exited during startup{code}; log {self.log_path}:\n{_tail(self.log_path)}"
                )
            try:
                if _probe(self.probe_port, timeout=2.0):
                    return
            except (OSError, struct.error):
                pass  # not listening yet, or mid-startup
            if time.monotonic() >= deadline:
                raise BrokerError(
                    f"kafka broker not ready on {self.bootstrap} after {timeout:.0f}s; "
                    f"log {self.log_path}:\n{_tail(self.log_path)}"
                )
            time.sleep(0.2)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM for a clean shutdown (flushes logs), SIGKILL if it hangs."""
        pid = self._read_pid() or (self._proc.pid if self._proc is not None else None)
        if pid is not None and (self._child_alive() or self.is_running()):
            self._signal(pid, signal.SIGTERM)
            if not self._wait_exit(timeout):
                self._signal(pid, signal.SIGKILL)
                if not self._wait_exit(10.0):
                    raise BrokerError(f"kafka broker pid {pid} survived SIGKILL")
        self._reap()
        self.pid_path.unlink(missing_ok=True)

    @staticmethod
    def _signal(pid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)  # pgid == pid: started with start_new_session

    def _wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._child_alive() or self.is_running():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True
