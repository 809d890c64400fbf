"""A throwaway PostgreSQL server for tests, from the machine's PostgreSQL binaries.

`with throwaway_postgres() as url:` runs initdb in a fresh temporary directory (as a
non-root user: initdb refuses root), starts the server with pg_ctl on a free loopback
port with its unix socket inside that directory, yields a connection URL, then stops the
server and deletes everything. Missing binaries fail the test with how to install them;
such a test is never skipped.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN_ENV = "SGDNOISE_PG_BIN"
SERVER_USER = "postgres"  # the non-root account the server runs as when tests run as root
INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found on PATH, in "
    f"${BIN_ENV} or under /usr/lib/postgresql/*/bin. Install them, e.g. "
    "`apt-get install postgresql` (Debian/Ubuntu), `dnf install postgresql-server` (Fedora) "
    "or `brew install postgresql@15` (macOS), or point ${BIN_ENV} at their directory."
)
_NEEDED = ("initdb", "pg_ctl", "postgres")


def find_bin() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres, or None."""
    candidates = []
    if os.environ.get(BIN_ENV):
        candidates.append(Path(os.environ[BIN_ENV]))
    if which := shutil.which("initdb"):
        candidates.append(Path(which).resolve().parent)
        candidates.append(Path(which).parent)
    patterns = (
        "/usr/lib/postgresql/*/bin",
        "/usr/pgsql-*/bin",
        "/opt/homebrew/opt/postgresql*/bin",
    )
    for pattern in patterns:
        candidates += [Path(p) for p in sorted(glob.glob(pattern), reverse=True)]
    for d in candidates:
        if all(os.access(d / name, os.X_OK) for name in _NEEDED):
            return d
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def throwaway_postgres(password: str | None = None) -> Iterator[str]:
    """Yield `postgresql://postgres[:password]@127.0.0.1:<port>/postgres`.

    The server trusts loopback connections, so any password works; tests pass one to
    check that it never leaks into logs, tags or output."""
    bindir = find_bin()
    if bindir is None:
        pytest.fail(INSTALL_HINT)
    # Directly under the system temp dir: pytest's own tmp dirs are private to root, and
    # the server's user must reach its data directory.
    tmp = Path(tempfile.mkdtemp(prefix="sgdnoise-pg-"))
    data, sock, log = tmp / "data", tmp / "sock", tmp / "server.log"
    sock.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam(SERVER_USER)
        except KeyError:
            shutil.rmtree(tmp, ignore_errors=True)
            pytest.fail(f"tests run as root and no {SERVER_USER!r} user exists to run initdb")
        for p in (tmp, sock):
            os.chown(p, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", SERVER_USER, "--"]

    def run(*args: str) -> None:
        proc = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({proc.returncode}):\n{proc.stderr}\n{tail}")

    port = free_port()
    opts = (
        f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off "
        "-c synchronous_commit=off -c full_page_writes=off -c max_connections=50"
    )
    started = False
    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
            "-E", "UTF8", "--no-sync")  # fmt: skip
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
            "-o", opts, "start")  # fmt: skip
        started = True
        auth = f"postgres:{password}" if password else "postgres"
        yield f"postgresql://{auth}@127.0.0.1:{port}/postgres"
    finally:
        if started:
            with contextlib.suppress(Exception):
                run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(tmp, ignore_errors=True)
