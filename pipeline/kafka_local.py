"""A real single-node Apache Kafka (KRaft) on loopback, from Maven Central jars, no Docker.

The jars are resolved once with ``mvn`` from deploy/kafka/pom.xml into a cache folder; each
broker instance (one per port) keeps its storage, config, log and pid file under
``<home>/broker-<port>/``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient

POM = Path(__file__).resolve().parent.parent / "deploy" / "kafka" / "pom.xml"

LOG4J = """\
log4j.rootLogger=INFO, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka=INFO
log4j.logger.org.apache.kafka=INFO
log4j.logger.state.change.logger=WARN
log4j.logger.kafka.log.LogCleaner=WARN
"""


class BrokerError(RuntimeError):
    """The local broker cannot be set up, started or stopped; the message says why."""


@dataclass(frozen=True)
class BrokerStatus:
    running: bool
    pid: int | None
    bootstrap: str
    log: Path

    def describe(self) -> str:
        if self.running:
            return f"kafka is up at {self.bootstrap} (pid {self.pid}); log: {self.log}"
        return f"kafka is down (would listen on {self.bootstrap}); log: {self.log}"


def _alive(pid: int) -> bool:
    """True when pid is a running (not zombie) Kafka broker process."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z" and b"kafka.Kafka" in cmdline


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


async def _serving(bootstrap: str) -> bool:
    """Whether the broker answers metadata and coordinates consumer groups. A new broker's
    first group lookup creates its offsets topic, and until that is ready aiokafka logs each
    retry of a consumer's lookup as an ERROR (GroupCoordinatorNotAvailableError): noise in
    the first worker's log, now spent here."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    try:
        await asyncio.wait_for(admin.start(), timeout=5)
        await asyncio.wait_for(admin.describe_cluster(), timeout=5)
        await asyncio.wait_for(admin.find_coordinator("loopline-broker-ready"), timeout=5)
        return True
    except Exception:
        return False
    finally:
        await admin.close()


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not java or not Path(java).exists():
        raise BrokerError("java not found: install OpenJDK 17 (or set JAVA_HOME)")
    return java


def new_cluster_id() -> str:
    """A random KRaft cluster id (base64url of a UUID) that does not start with "-": the
    storage tool would take such an id for an option, as Kafka's own Uuid avoids too."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


@dataclass(frozen=True)
class LocalBroker:
    """One single-node combined broker+controller; controller port defaults to port + 1."""

    home: Path
    port: int = 9092
    host: str = "127.0.0.1"
    heap: str = "768m"
    pom: Path = POM
    # Also listen with SASL (SCRAM-SHA-512 and PLAIN) over TLS on port + 2, with a certificate
    # and a client password made for this broker (see ``secure_env``).
    secure: bool = False

    @property
    def secure_port(self) -> int:
        return self.port + 2

    @property
    def secure_env_path(self) -> Path:
        """LOOPLINE_* settings for a client of the secure listener (password included; 0600)."""
        return self.instance_dir / "secure.env"

    def secure_env(self) -> dict[str, str]:
        values = {}
        for line in self.secure_env_path.read_text().splitlines():
            key, _, value = line.partition("=")
            values[key] = value
        return values

    def _tls(self) -> tuple[Path, str]:
        """A self-signed certificate for 127.0.0.1/localhost (made once with the JDK's keytool);
        its PEM is the CA file clients verify the broker with. Returns (keystore, password)."""
        tls = self.instance_dir / "tls"
        keystore, ca = tls / "broker.p12", tls / "ca.pem"
        password_file = tls / "keystore.password"
        if not keystore.exists():
            tls.mkdir(parents=True, exist_ok=True)
            password_file.touch(mode=0o600)
            password_file.write_text(secrets.token_urlsafe(18))
            password = password_file.read_text()
            keytool = str(Path(_java()).parent / "keytool")
            for args in (
                [
                    "-genkeypair",
                    "-alias",
                    "broker",
                    "-keyalg",
                    "RSA",
                    "-keysize",
                    "2048",
                    "-validity",
                    "3650",
                    "-dname",
                    "CN=localhost",
                    "-ext",
                    f"SAN=ip:{self.host},dns:localhost",
                    "-storetype",
                    "PKCS12",
                    "-keystore",
                    str(keystore),
                    "-storepass",
                    password,
                    "-keypass",
                    password,
                ],
                [
                    "-exportcert",
                    "-rfc",
                    "-alias",
                    "broker",
                    "-keystore",
                    str(keystore),
                    "-storepass",
                    password,
                    "-file",
                    str(ca),
                ],
            ):
                done = subprocess.run([keytool, *args], capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    raise BrokerError(f"keytool failed: {done.stdout}{done.stderr}")
        if not self.secure_env_path.exists():
            self.secure_env_path.touch(mode=0o600)
            self.secure_env_path.write_text(
                "\n".join(
                    [
                        f"LOOPLINE_BOOTSTRAP_SERVERS={self.host}:{self.secure_port}",
                        "LOOPLINE_SECURITY_PROTOCOL=SASL_SSL",
                        "LOOPLINE_SASL_MECHANISM=SCRAM-SHA-512",
                        "LOOPLINE_SASL_USERNAME=loopline",
                        f"LOOPLINE_SASL_PASSWORD={secrets.token_urlsafe(18)}",
                        f"LOOPLINE_SSL_CAFILE={ca}",
                        "",
                    ]
                )
            )
        return keystore, password_file.read_text()

    def _secure_lines(self) -> list[str]:
        keystore, password = self._tls()
        user = self.secure_env()
        jaas_plain = (
            "org.apache.kafka.common.security.plain.PlainLoginModule required "
            f'user_{user["LOOPLINE_SASL_USERNAME"]}="{user["LOOPLINE_SASL_PASSWORD"]}";'
        )
        return [
            # ACLs can be tried on the secure listener: a principal may do what no ACL denies,
            # and the plain listener and the controller (ANONYMOUS) are super users.
            "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "allow.everyone.if.no.acl.found=true",
            "super.users=User:ANONYMOUS",
            "sasl.enabled.mechanisms=SCRAM-SHA-512,PLAIN",
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config="
            "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            f"listener.name.sasl_ssl.plain.sasl.jaas.config={jaas_plain}",
            f"ssl.keystore.location={keystore}",
            "ssl.keystore.type=PKCS12",
            f"ssl.keystore.password={password}",
            f"ssl.key.password={password}",
        ]

    def tool(self, main: str, *args: str) -> subprocess.CompletedProcess[str]:
        """Run one of Kafka's command-line tools (``kafka.admin.AclCommand``, say) against this
        broker's plain listener, where ``--bootstrap-server`` is ``self.bootstrap``."""
        return subprocess.run(
            self._java_cmd(self.libs_dir(), main, "--bootstrap-server", self.bootstrap, *args),
            capture_output=True,
            text=True,
            check=False,
        )

    def _add_scram_user(self) -> None:
        """The client's SCRAM credential, stored by the controller (through the plain listener)."""
        user = self.secure_env()
        done = self.tool(
            "kafka.admin.ConfigCommand",
            "--alter",
            "--entity-type",
            "users",
            "--entity-name",
            user["LOOPLINE_SASL_USERNAME"],
            "--add-config",
            f"SCRAM-SHA-512=[iterations=4096,password={user['LOOPLINE_SASL_PASSWORD']}]",
        )
        if done.returncode != 0:
            raise BrokerError("could not create the SCRAM user (see the broker log)")

    @property
    def controller_port(self) -> int:
        return self.port + 1

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def instance_dir(self) -> Path:
        return self.home / f"broker-{self.port}"

    @property
    def log_path(self) -> Path:
        return self.instance_dir / "broker.log"

    @property
    def pid_path(self) -> Path:
        return self.instance_dir / "broker.pid"

    def _pid(self) -> int | None:
        try:
            return int(self.pid_path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def status(self) -> BrokerStatus:
        pid = self._pid()
        running = pid is not None and _alive(pid)
        return BrokerStatus(running, pid if running else None, self.bootstrap, self.log_path)

    def libs_dir(self, echo: Callable[[str], None] = print) -> Path:
        """The broker's jars, resolved from Maven Central on first use and cached after."""
        if not self.pom.exists():
            raise BrokerError(f"{self.pom} not found (run loopline from its source checkout)")
        digest = hashlib.sha256(self.pom.read_bytes()).hexdigest()[:12]
        libs = self.home / f"libs-{digest}"
        if (libs / ".complete").exists():
            return libs
        mvn = shutil.which("mvn")
        if mvn is None:
            raise BrokerError("mvn not found: install Maven to resolve the Kafka jars")
        staging = self.home / f".libs-{digest}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        echo(f"resolving the Kafka broker jars from Maven Central into {libs} (once) ...")
        cmd = [
            mvn,
            "-B",
            "-q",
            "-f",
            str(self.pom),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={staging}",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
            raise BrokerError(f"mvn could not resolve the Kafka jars:\n{tail}")
        (staging / ".complete").touch()
        shutil.rmtree(libs, ignore_errors=True)
        staging.rename(libs)
        return libs

    def _write_config(self) -> Path:
        self.instance_dir.mkdir(parents=True, exist_ok=True)
        secure_listener = f",SASL_SSL://{self.host}:{self.secure_port}" if self.secure else ""
        (self.instance_dir / "log4j.properties").write_text(LOG4J)
        config = self.instance_dir / "server.properties"
        config.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.voters=1@{self.host}:{self.controller_port}",
                    f"listeners=PLAINTEXT://{self.host}:{self.port},"
                    f"CONTROLLER://{self.host}:{self.controller_port}" + secure_listener,
                    f"advertised.listeners=PLAINTEXT://{self.host}:{self.port}" + secure_listener,
                    "controller.listener.names=CONTROLLER",
                    "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
                    + (",SASL_SSL:SASL_SSL" if self.secure else ""),
                    *(self._secure_lines() if self.secure else []),
                    "inter.broker.listener.name=PLAINTEXT",
                    f"log.dirs={self.instance_dir / 'data'}",
                    # loopline creates its topics with the partition count it is configured
                    # for; a silently auto-created one-partition topic would break co-partitioning.
                    "auto.create.topics.enable=false",
                    "num.partitions=4",
                    "offsets.topic.replication.factor=1",
                    "offsets.topic.num.partitions=10",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "group.initial.rebalance.delay.ms=0",
                    "",
                ]
            )
        )
        return config

    def _java_cmd(self, libs: Path, main: str, *args: str) -> list[str]:
        log4j = self.instance_dir / "log4j.properties"
        return [
            _java(),
            f"-Xmx{self.heap}",
            f"-Xms{self.heap}",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{log4j}",
            "-cp",
            f"{libs}/*",
            main,
            *args,
        ]

    def up(self, timeout: float = 120.0, echo: Callable[[str], None] = print) -> BrokerStatus:
        """Start the broker unless it is up; return once it answers metadata and group lookups."""
        current = self.status()
        if current.running:
            return current
        for port in (self.port, self.controller_port):
            if _port_open(self.host, port):
                raise BrokerError(
                    f"port {self.host}:{port} is in use by another process, not by the loopline "
                    f"broker of {self.instance_dir}; choose another port"
                )
        libs = self.libs_dir(echo)
        config = self._write_config()
        cluster_file = self.instance_dir / "cluster.id"
        if not cluster_file.exists():
            cluster_file.write_text(new_cluster_id())
        fmt = subprocess.run(
            self._java_cmd(
                libs,
                "kafka.tools.StorageTool",
                "format",
                "-t",
                cluster_file.read_text().strip(),
                "-c",
                str(config),
                "--ignore-formatted",
            ),
            capture_output=True,
            text=True,
            check=False,
        )
        if fmt.returncode != 0:
            raise BrokerError(f"formatting KRaft storage failed:\n{fmt.stdout}{fmt.stderr}")
        echo(f"starting kafka on {self.bootstrap} (log: {self.log_path}) ...")
        with self.log_path.open("ab") as log:
            proc = subprocess.Popen(
                self._java_cmd(libs, "kafka.Kafka", str(config)),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.pid_path.write_text(str(proc.pid))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BrokerError(
                    f"kafka exited with code {proc.returncode} while starting; "
                    f"last lines of {self.log_path}:\n{self._log_tail()}"
                )
            if _port_open(self.host, self.port) and asyncio.run(_serving(self.bootstrap)):
                if self.secure:
                    self._add_scram_user()
                return self.status()
            time.sleep(0.5)
        self.down()
        raise BrokerError(f"kafka did not answer within {timeout:.0f}s:\n{self._log_tail()}")

    def down(self, timeout: float = 30.0) -> bool:
        """Stop the broker (SIGTERM, then SIGKILL after timeout); False when it was not up."""
        pid = self._pid()
        if pid is None or not _alive(pid):
            self.pid_path.unlink(missing_ok=True)
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
            while _alive(pid):
                time.sleep(0.1)
        self.pid_path.unlink(missing_ok=True)
        return True

    def wipe(self) -> None:
        """Delete a stopped broker's data (topics, offsets, cluster id): the next ``up`` starts
        empty. For the test and bench broker, whose per-run topics would otherwise pile up
        until the broker runs out of file descriptors, and for the demo's (``demo_owned``)."""
        if self.status().running:
            raise BrokerError(f"kafka on {self.bootstrap} is running; stop it before wiping")
        shutil.rmtree(self.instance_dir / "data", ignore_errors=True)
        (self.instance_dir / "cluster.id").unlink(missing_ok=True)
        self.demo_marker.unlink(missing_ok=True)

    @property
    def has_data(self) -> bool:
        """Whether a broker ran here since the last wipe (its topics and offsets are kept)."""
        return (self.instance_dir / "data").exists()

    @property
    def demo_marker(self) -> Path:
        """Present while the data here is only a demo's: the next demo may empty it."""
        return self.instance_dir / "made-by-demo"

    def own(self, demo: bool) -> None:
        """Say whose the data is: a demo's (which the next demo empties) or a user's (kept)."""
        if demo:
            self.demo_marker.write_text("the topics here were made by 'loopline demo'\n")
        else:
            self.demo_marker.unlink(missing_ok=True)

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"
