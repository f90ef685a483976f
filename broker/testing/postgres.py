"""A throwaway PostgreSQL server for tests and demos: a temporary folder, a loopback port, gone after.

`PostgresServer().start()` runs `initdb` and `pg_ctl` from the machine's PostgreSQL
(`pg_config --bindir`, PATH, `/usr/lib/postgresql/*/bin`), or from the `pgserver` wheel when
the machine has none. PostgreSQL refuses to run as root, so as root the server runs as an
unprivileged user (`postgres` if it exists, else `nobody`) through `runuser`.

Password authentication is real on TCP (scram-sha-256): a superuser `postgres` with a random
password, so tests can prove that a wrong or dropped login is refused. The unix socket in the
folder trusts local connections, for the fixture's own housekeeping only.

PostgreSQL cannot listen on port 0, so a port is chosen at random and the start is retried on
another one when that port turns out to be taken: no port is picked, released and hoped for.
"""

from __future__ import annotations

import glob
import os
import pwd
import random
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

_PORT_RANGE = (20000, 60000)
_START_ATTEMPTS = 8
_SETTINGS = (
    "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200 "
    "-c shared_buffers=32MB -c log_min_messages=warning"
)


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries could be found or started."""


def wheel_bindir() -> Path | None:
    """The binaries of the `pgserver` wheel, if it is installed."""
    try:  # imported only when asked for: the wheel's import has side effects
        import pgserver  # type: ignore[import-untyped]
    except ImportError:
        return None
    folder = Path(pgserver.__file__).parent / "pginstall" / "bin"
    return folder if (folder / "initdb").exists() else None


def find_bindir() -> Path:
    """The folder holding `initdb` and `pg_ctl`.

    Raises:
        PostgresUnavailable: neither the machine nor the `pgserver` wheel has PostgreSQL.
    """
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False).stdout.strip()
        if out:
            candidates.append(Path(out))
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).parent)
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for folder in candidates:
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            return folder
    folder = wheel_bindir()
    if folder is not None:
        return folder
    raise PostgresUnavailable("no PostgreSQL found: install it, or pip install pgserver")


def _run_as() -> str | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise PostgresUnavailable("running as root and no unprivileged user (postgres, nobody) to run PostgreSQL as")


class PostgresServer:
    """One PostgreSQL cluster in a temporary folder, listening on 127.0.0.1 and a unix socket."""

    def __init__(self, bindir: Path | None = None) -> None:
        self.bindir = bindir or find_bindir()
        self.user = "postgres"
        self.password = secrets.token_urlsafe(18)
        self.port = 0
        self._user = _run_as()
        self._folder = Path(tempfile.mkdtemp(prefix="broker-pg-"))
        self._data = self._folder / "data"
        self._socket_dir = self._folder / "run"
        self._log = self._folder / "postgres.log"
        self._initialised = False

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def dsn(self, dbname: str = "postgres", *, user: str | None = None, password: str | None = None) -> str:
        """A libpq connection string over TCP with password authentication."""
        user = user or self.user
        password = self.password if password is None and user == self.user else password
        parts = [f"host={self.host}", f"port={self.port}", f"dbname={dbname}", f"user={user}", "connect_timeout=5"]
        if password is not None:
            parts.append(f"password={password}")
        return " ".join(parts)

    def _cmd(self, *argv: str) -> list[str]:
        command = [str(self.bindir / argv[0]), *argv[1:]]
        return ["runuser", "-u", self._user, "--", *command] if self._user else command

    def _own(self, path: Path) -> None:
        if self._user:
            entry = pwd.getpwnam(self._user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _initdb(self) -> None:
        self._socket_dir.mkdir()
        self._own(self._socket_dir)
        pwfile = self._folder / "pwfile"
        pwfile.write_text(self.password + "\n")
        os.chmod(pwfile, 0o600)
        self._own(pwfile)
        self._own(self._folder)
        result = subprocess.run(
            self._cmd(
                "initdb", "-D", str(self._data), "-U", self.user, f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--no-instructions",
            ),
            capture_output=True, text=True, check=False,
        )
        pwfile.unlink()
        if result.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {result.stderr.strip()[-500:]}")
        self._initialised = True

    def start(self) -> PostgresServer:
        """Initialise (once) and start the server; return self.

        Raises:
            PostgresUnavailable: the server did not start on any of several ports.
        """
        if not self._initialised:
            self._initdb()
        ports = [self.port] if self.port else []
        ports += random.sample(range(*_PORT_RANGE), _START_ATTEMPTS)
        for port in ports:
            options = f"-p {port} -k {self._socket_dir} -c listen_addresses=127.0.0.1 {_SETTINGS}"
            result = subprocess.run(
                self._cmd("pg_ctl", "-D", str(self._data), "-l", str(self._log), "-o", options, "-w", "start"),
                capture_output=True, text=True, check=False,
            )
            if result.returncode == 0:
                self.port = port
                return self
            log = self._log.read_text(errors="replace") if self._log.exists() else ""
            if "could not bind" not in log and "already in use" not in log:
                raise PostgresUnavailable(f"pg_ctl start failed: {(result.stderr + log).strip()[-800:]}")
        raise PostgresUnavailable("pg_ctl start failed: every port tried was taken")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`mode` "fast" or "immediate"); the data stays for a later `start`."""
        if self._initialised and (self._data / "postmaster.pid").exists():
            subprocess.run(
                self._cmd("pg_ctl", "-D", str(self._data), "-m", mode, "-w", "stop"),
                capture_output=True, text=True, check=False,
            )

    def is_running(self) -> bool:
        result = subprocess.run(
            self._cmd("pg_ctl", "-D", str(self._data), "status"), capture_output=True, text=True, check=False
        )
        return result.returncode == 0

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run `sql` as the superuser over the local socket; return psql's output.

        Raises:
            RuntimeError: psql failed.
        """
        psql = self.bindir / "psql"
        command = [str(psql), "-h", str(self._socket_dir), "-p", str(self.port), "-U", self.user, "-d", dbname,
                   "-v", "ON_ERROR_STOP=1", "-At", "-c", sql]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr.strip()}")
        return result.stdout

    def create_database(self, name: str) -> str:
        """Create database `name` (an identifier of [a-z0-9_]); return its superuser DSN."""
        if not name.replace("_", "").isalnum() or not name.islower():
            raise ValueError("database names here are lower-case [a-z0-9_]")
        self.psql(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def close(self) -> None:
        """Stop the server and remove its folder."""
        self.stop("immediate")
        shutil.rmtree(self._folder, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
