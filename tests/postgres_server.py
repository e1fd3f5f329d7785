"""A throwaway PostgreSQL 15 cluster for the tests: its own folder, its own loopback port, never the system one.

The postgresql journal has to be tested against the real server (locking, reconnects, the server going away),
so the tests start one here rather than mocking it. initdb and pg_ctl refuse to run as root: as root (CI
containers) they run as the `postgres` user that Debian's postgresql-15 package creates.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

BIN = Path("/usr/lib/postgresql/15/bin")
INSTALL_HINT = "apt-get install postgresql-15 (.ci/run installs it)"

# Speed over durability: the data is thrown away at the end of the session.
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "wal_level": "minimal",  # no WAL kept for replicas...
    "max_wal_senders": "0",  # ...which wal_level=minimal requires
    "shared_buffers": "16MB",
    "huge_pages": "off",  # no probing for huge pages at start
    "autovacuum": "off",
    "jit": "off",
    "max_connections": "100",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _searchable_by_all(path: Path) -> bool:
    """Whether another user (postgres) can reach into `path`: every folder up to / has the x bit for others."""
    return all(os.stat(p).st_mode & 0o001 for p in [path, *path.parents])


class PostgresServer:
    """One cluster in a temporary folder on 127.0.0.1:<free port>; `start()` creates it on first use.

    `stop()` keeps the data and the port, so `start()` again (or `restart()`) brings back the same server at the
    same DSN: that is how tests make the database go away and come back. `close()` stops and deletes it all.
    """

    def __init__(self, start_timeout: float = 30.0) -> None:
        self.start_timeout = start_timeout
        self.port: int | None = None
        self.folder: Path | None = None
        self._databases = 0

    # ------------------------------------------------------------------ paths

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def log_file(self) -> Path:
        return self.folder / "server.log"

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "PostgresServer":
        """Create the cluster on first call, then start it and wait until it accepts TCP connections.

        The first start picks a free port and tries another if someone took it meanwhile; later starts
        keep that port, so DSNs handed out stay valid.
        """
        if self.folder is None:
            self._create_cluster()
        first = self.port is None
        for attempt in range(3 if first else 1):
            if first:
                self.port = _free_port()
            try:
                self._pg_ctl("start", "-w", "-t", str(int(self.start_timeout)), "-l", str(self.log_file),
                             "-o", f"-p {self.port}")
                break
            except RuntimeError as err:
                if not first or attempt == 2 or "Address already in use" not in str(err):
                    raise
        self._wait_ready()
        return self

    def stop(self) -> None:
        """Fast shutdown (open sessions are cut off, as when a database server goes away). Data is kept."""
        if self.folder is not None and (self.data / "postmaster.pid").exists():
            self._pg_ctl("stop", "-m", "fast", "-w", "-t", str(int(self.start_timeout)))

    def restart(self) -> None:
        """Stop, then start again on the same port with the same data."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop and delete the cluster's folder."""
        self.stop()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = self.port = None

    def __enter__(self) -> "PostgresServer":
        try:
            return self.start()
        except BaseException:
            self.close()  # __exit__ is not called when __enter__ fails
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ connecting

    def dsn(self, dbname: str = "postgres") -> str:
        """A libpq conninfo string; trust authentication, so no password."""
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname}"

    def create_database(self) -> str:
        """A new empty database with a unique name, so each test starts from nothing; returns its DSN."""
        import psycopg
        from psycopg import sql

        self._databases += 1
        name = f"test_{self._databases}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self.dsn("postgres"), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn(name)

    # ------------------------------------------------------------------ internals

    def _create_cluster(self) -> None:
        for tool in ("initdb", "pg_ctl", "postgres", "pg_isready"):
            if not os.access(BIN / tool, os.X_OK):
                raise RuntimeError(f"PostgreSQL 15 is not installed ({BIN / tool} is missing): {INSTALL_HINT}")
        base = Path(tempfile.gettempdir())
        if os.geteuid() == 0 and not _searchable_by_all(base):
            base = Path("/tmp")  # the postgres user must be able to walk down to the data folder
        folder = Path(tempfile.mkdtemp(prefix="pg15-test-", dir=base))
        folder.chmod(0o755)
        if os.geteuid() == 0:
            try:
                shutil.chown(folder, "postgres", "postgres")
            except LookupError as err:
                raise RuntimeError(f"no `postgres` user to run PostgreSQL as root: {INSTALL_HINT}") from err
        self.folder = folder
        self._run("initdb", "--auth=trust", "-U", "postgres", "--no-sync", "--no-instructions",
                  "-E", "UTF8", "--locale=C", "-D", str(self.data))
        settings = {**SETTINGS, "unix_socket_directories": f"'{self.folder}'"}
        with open(self.data / "postgresql.conf", "a", encoding="utf-8") as conf:  # appending keeps the owner
            conf.write("\n# tests/postgres_server.py\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    def _wait_ready(self) -> None:
        """pg_ctl waited for the postmaster; confirm over TCP, which is what the tests use."""
        deadline = time.monotonic() + self.start_timeout
        while subprocess.run([str(BIN / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port),
                              "-U", "postgres", "-t", "1"], check=False).returncode != 0:
            if time.monotonic() > deadline:
                log = self.log_file.read_text(errors="replace") if self.log_file.exists() else "(no log file)"
                raise RuntimeError(f"PostgreSQL did not accept connections on 127.0.0.1:{self.port} within "
                                   f"{self.start_timeout:.0f}s; server log {self.log_file}:\n{log}")
            time.sleep(0.05)

    def _pg_ctl(self, *args: str) -> None:
        self._run("pg_ctl", "-D", str(self.data), *args)

    def _run(self, tool: str, *args: str) -> None:
        """Run a server tool, as the postgres user when we are root (initdb and pg_ctl refuse root)."""
        command = [str(BIN / tool), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        # cwd: the postgres user may not be allowed into the caller's working directory.
        done = subprocess.run(command, cwd=self.folder, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            log = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
                               + (f"\nserver log {self.log_file}:\n{log}" if log else ""))
