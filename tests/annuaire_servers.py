"""Directory servers for the annuaire tests and benchmarks.

- :class:`Slapd`: a real OpenLDAP ``slapd`` on loopback ports, configured from
  scratch in a temporary directory (cn=config built by ``slapadd -n0`` from the
  shipped ``config/ldap/mssante.ldif``), loaded with the synthetic population by
  ``slapadd``, listening on ldap:// (StartTLS) and ldaps:// with the dev PKI.
- :class:`StallingServer`: accepts TCP connections and never answers.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from server_processes import find_program, free_port, listening, stop_process

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_LDIF = ROOT / "config" / "ldap" / "mssante.ldif"
SCHEMA_FILE = ROOT / "config" / "ldap" / "mssante.schema"
SYSTEM_SCHEMAS = Path("/etc/ldap/schema")
BASE_DN = "dc=annuaire,dc=test"
ADMIN_DN = f"cn=admin,{BASE_DN}"
ADMIN_PASSWORD = "admin-secret-for-tests"
READER_DN = f"cn=lecteur,{BASE_DN}"
READER_PASSWORD = "reader-secret-for-tests"
PUBLISH_DN = f"ou=publication,{BASE_DN}"


def config_ldif(directory: Path, cert: Path, key: Path, ca: Path) -> str:
    return f"""dn: cn=config
objectClass: olcGlobal
cn: config
olcPidFile: {directory}/slapd.pid
olcTLSCertificateFile: {cert}
olcTLSCertificateKeyFile: {key}
olcTLSCACertificateFile: {ca}
olcSizeLimit: size.soft=500 size.hard=500 size.prtotal=unlimited

dn: cn=module,cn=config
objectClass: olcModuleList
cn: module
olcModulePath: /usr/lib/ldap
olcModuleLoad: back_mdb

dn: cn=schema,cn=config
objectClass: olcSchemaConfig
cn: schema

include: file://{SYSTEM_SCHEMAS}/core.ldif
include: file://{SYSTEM_SCHEMAS}/cosine.ldif
include: file://{SYSTEM_SCHEMAS}/inetorgperson.ldif
include: file://{SCHEMA_LDIF}

dn: olcDatabase=frontend,cn=config
objectClass: olcDatabaseConfig
objectClass: olcFrontendConfig
olcDatabase: frontend

dn: olcDatabase=config,cn=config
objectClass: olcDatabaseConfig
olcDatabase: config

dn: olcDatabase=mdb,cn=config
objectClass: olcDatabaseConfig
objectClass: olcMdbConfig
olcDatabase: mdb
olcSuffix: {BASE_DN}
olcRootDN: {ADMIN_DN}
olcRootPW: {ADMIN_PASSWORD}
olcDbDirectory: {directory}/data
olcDbMaxSize: 1073741824
olcDbIndex: objectClass eq
olcDbIndex: mssanteAddress eq
olcDbIndex: mssanteIdNatPs eq
olcDbIndex: sn eq,sub
olcDbIndex: l eq,sub
olcDbIndex: postalCode eq,sub
olcDbIndex: mssanteProfessionCode eq
olcAccess: to attrs=userPassword by anonymous auth by * none
olcAccess: to * by * read
"""


@dataclass
class Slapd:
    directory: Path
    cert: Path
    key: Path
    ca: Path
    process: subprocess.Popen[bytes] | None = None
    ldap_port: int = 0
    ldaps_port: int = 0
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.directory / "slapd.log"

    @property
    def ldap_url(self) -> str:
        return f"ldap://127.0.0.1:{self.ldap_port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://localhost:{self.ldaps_port}"

    def configure(self, population_ldif: Path) -> None:
        slapadd = find_program("slapadd")
        assert slapadd is not None
        config = self.directory / "slapd.d"
        config.mkdir()
        (self.directory / "data").mkdir()
        ldif = self.directory / "config.ldif"
        ldif.write_text(config_ldif(self.directory, self.cert, self.key, self.ca))
        self._run([slapadd, "-n0", "-F", str(config), "-l", str(ldif)])
        self._run([slapadd, "-q", "-F", str(config), "-b", BASE_DN, "-l", str(population_ldif)])

    def _run(self, command: list[str]) -> None:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}")

    def start(self, timeout: float = 20.0) -> Slapd:
        slapd = find_program("slapd")
        assert slapd is not None
        self.ldap_port, self.ldaps_port = free_port(), free_port()
        urls = f"ldap://127.0.0.1:{self.ldap_port}/ ldaps://127.0.0.1:{self.ldaps_port}/"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [slapd, "-d", "0", "-h", urls, "-F", str(self.directory / "slapd.d")],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if listening(self.process, self.ldap_port, timeout):
            return self
        exited = self.process.poll() is not None
        self.stop()
        what = "exited" if exited else "did not listen"
        raise RuntimeError(f"slapd {what}:\n{self.log.read_text(errors='replace')}")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        self.process = None


class StallingServer:
    """Accepts connections and reads, but never writes a byte: a directory
    server that hangs."""

    def __init__(self) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(64)
        self.port = int(self.socket.getsockname()[1])
        self.connections: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.socket.settimeout(0.2)
        while not self._stop.is_set():
            try:
                connection, _ = self.socket.accept()
            except OSError:
                continue
            self.connections.append(connection)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for connection in self.connections:
            connection.close()
        self.socket.close()


class TlsOnlyServer:
    """Completes TLS handshakes (nothing more) with the given server context, and
    records each outcome: a directory server whose TLS the client must judge."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(16)
        self.port = int(self.socket.getsockname()[1])
        self.outcomes: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.socket.settimeout(0.2)
        while not self._stop.is_set():
            try:
                connection, _ = self.socket.accept()
            except OSError:
                continue
            connection.settimeout(5)
            try:
                with self.context.wrap_socket(connection, server_side=True) as tls:
                    self.outcomes.append(f"handshake done: {tls.cipher()}")
            except (ssl.SSLError, OSError) as error:
                self.outcomes.append(f"handshake failed: {error}")

    def wait_for_outcomes(self, timeout: float = 5.0) -> list[str]:
        """The outcomes, once the server has recorded at least one (its thread
        records a handshake after the client may already have given up)."""
        deadline = time.monotonic() + timeout
        while not self.outcomes and time.monotonic() < deadline:
            time.sleep(0.02)
        return list(self.outcomes)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.socket.close()
