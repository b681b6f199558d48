"""PostgreSQL for the tests: the server that $ZIMAGE_TEST_PG_URL names (CI starts one, see .ci/run), else a
throwaway cluster of our own when PostgreSQL's binaries are installed (a private data dir, a unix socket in it,
no TCP). Each test gets a schema of its own. Tests skip only when neither is possible, and not even then when
$ZIMAGE_TEST_REQUIRE_PG is set (CI sets it: there they must run).
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

URL_ENV = "ZIMAGE_TEST_PG_URL"
REQUIRE_ENV = "ZIMAGE_TEST_REQUIRE_PG"


def find_bindir() -> Path | None:
    if os.environ.get("ZIMAGE_TEST_PG_BIN"):
        return Path(os.environ["ZIMAGE_TEST_PG_BIN"])
    if shutil.which("initdb"):
        return Path(shutil.which("initdb")).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))  # Debian/Ubuntu keep them off PATH
    return Path(found[-1]).parent if found else None


def unavailable_reason() -> str | None:
    """None when PostgreSQL tests can run here."""
    if os.environ.get(URL_ENV) or find_bindir() is not None:
        return None
    return f"PostgreSQL not available: set {URL_ENV} or install PostgreSQL (Debian: apt-get install postgresql)"


class Cluster:
    """A throwaway PostgreSQL cluster. PostgreSQL refuses to run as root, so as root it runs as the `postgres`
    user (which Debian's package creates)."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="zimage-pg-"))
        self.data = self.dir / "data"
        self.port = 5432  # on a unix socket in self.dir: never clashes with another cluster's port
        self._as = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
            self.user = "postgres"
        else:
            self.user = pwd.getpwuid(os.geteuid()).pw_name
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", self.user, "--no-sync", "-E", "UTF8")
        self.start()

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self._as, str(self.bindir / tool), *args], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, cwd=self.dir)

    def start(self) -> None:
        # fsync off: a throwaway cluster need not survive power loss, and it spares the shared disk.
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"), "-w", "-t", "60", "start", "-o",
                  f"-k {self.dir} -c listen_addresses='' -p {self.port} -c fsync=off -c max_connections=200")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@/postgres?host={self.dir}&port={self.port}"

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


def with_schema(url: str, schema: str) -> str:
    """`url` whose connections use `schema` (search_path): how a store shares a database with other data."""
    from urllib.parse import quote, urlsplit, urlunsplit

    parts = urlsplit(url)
    query = "&".join(filter(None, [parts.query, "options=" + quote(f"-csearch_path={schema}")]))
    return urlunsplit(parts._replace(query=query))


def create_schema(admin_url: str) -> tuple[str, str]:
    """A fresh empty schema (a database per test costs ~1 s to create; a schema a few ms); returns (name, URL)."""
    import psycopg

    name = "zimage_test_" + secrets.token_hex(6)
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{name}"')
    return name, with_schema(admin_url, name)


def drop_schema(admin_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def skip_or_fail(reason: str):
    import pytest

    if os.environ.get(REQUIRE_ENV):
        pytest.fail(f"{reason} (and ${REQUIRE_ENV} is set)")
    pytest.skip(reason)


# ---------------------------------------------------------------- fixtures (imported by the test modules using them)
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def pg_admin_url():
    """A URL of a PostgreSQL server the tests may create schemas on."""
    reason = unavailable_reason()
    if reason:
        skip_or_fail(reason)
    if os.environ.get(URL_ENV):
        wait_until_up(os.environ[URL_ENV])
        yield os.environ[URL_ENV]
        return
    cluster = Cluster(find_bindir())
    yield cluster.url
    cluster.destroy()


@pytest.fixture
def pg_url(pg_admin_url):
    """An empty schema of its own for one test."""
    name, url = create_schema(pg_admin_url)
    yield url
    drop_schema(pg_admin_url, name)


@pytest.fixture
def pg_cluster():
    """A cluster of this test's own, to stop and start (needs PostgreSQL's binaries, not just a URL)."""
    bindir = find_bindir()
    if bindir is None:
        skip_or_fail("PostgreSQL's binaries (initdb, pg_ctl) are not installed")
    cluster = Cluster(bindir)
    yield cluster
    cluster.destroy()


def wait_until_up(url: str, timeout: float = 30.0) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(url, connect_timeout=2):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
