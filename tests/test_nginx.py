"""deploy/nginx/authsvc.conf, run by Debian's nginx in front of two `authsvc serve`
replicas on loopback: calls from one client connection are spread over both, and a replica
dying under load (killed, or drained by SIGTERM) costs no Validate call of a client with
the documented retry policy."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from authsvc_client.client import AuthClient

from tests.live_server import PASSWORD
from tests.replica_processes import Replica, free_loopback_port, replicas, validate_load
from tests.test_cli import _server_env
from tests.test_replicas import _create_user

NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
CONF = Path(__file__).resolve().parent.parent / "deploy" / "nginx" / "authsvc.conf"

NEEDS_NGINX = pytest.mark.skipif(
    NGINX is None,
    reason="nginx is not installed (apt-get install nginx-light; .ci/run installs it)",
)
pytestmark = [pytest.mark.system, NEEDS_NGINX]

_UPSTREAM_SERVER = re.compile(r"^(\s*server )authsvc-\d:50051( .*;)$", re.MULTILINE)
_LISTEN = re.compile(r"^(\s*listen )50051( http2;)$", re.MULTILINE)


def site_config(upstreams: list[str], port: int, *, down: frozenset[str] = frozenset()) -> str:
    """The shipped file with the replicas' addresses and a loopback listen port put in,
    and the replicas in `down` marked down (taken out of rotation); nothing else changes."""
    text = CONF.read_text()
    servers = _UPSTREAM_SERVER.findall(text)
    assert len(servers) == len(upstreams) == 2, "the shipped upstream has two replicas"
    replacements = iter(upstreams)

    def server_line(match: re.Match[str]) -> str:
        address = next(replacements)
        parameters = match.group(2)
        if address in down:
            parameters = parameters.removesuffix(";") + " down;"
        return f"{match.group(1)}{address}{parameters}"

    text = _UPSTREAM_SERVER.sub(server_line, text)
    text, listens = _LISTEN.subn(rf"\g<1>127.0.0.1:{port}\g<2>", text)
    assert listens == 1
    return text


@dataclass
class Nginx:
    """A running nginx with the shipped site file."""

    process: subprocess.Popen[str]
    port: int
    workdir: Path
    upstreams: list[str]

    def take_out(self, address: str) -> None:
        """Mark a replica down and reload (SIGHUP): how an operator drains a replica from
        nginx, which cannot see its health status, before stopping it."""
        site = site_config(self.upstreams, self.port, down=frozenset({address}))
        (self.workdir / "authsvc.conf").write_text(site)
        self.process.send_signal(signal.SIGHUP)


@contextmanager
def nginx(upstreams: list[str], workdir: Path) -> Iterator[Nginx]:
    """nginx in the foreground with the shipped site file."""
    assert NGINX is not None
    port = free_loopback_port()
    workdir.mkdir()
    (workdir / "authsvc.conf").write_text(site_config(upstreams, port))
    (workdir / "nginx.conf").write_text(
        f"""daemon off;
worker_processes 2;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body;
    include {workdir}/authsvc.conf;
}}
"""
    )
    command = [NGINX, "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-e", "stderr"]
    checked = subprocess.run([*command, "-t"], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stderr
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else "nginx exited"
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "nginx did not listen"
            time.sleep(0.05)
        yield Nginx(proc, port, workdir, upstreams)
    finally:
        proc.send_signal(signal.SIGQUIT)  # graceful stop
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_shipped_config_is_rewritten_only_where_addresses_go() -> None:
    text = site_config(["127.0.0.1:1111", "127.0.0.1:2222"], 3333)
    original = CONF.read_text()
    assert "server 127.0.0.1:1111 max_fails=1 fail_timeout=5s;" in text
    assert "server 127.0.0.1:2222 max_fails=1 fail_timeout=5s;" in text
    assert "listen 127.0.0.1:3333 http2;" in text
    assert len(text.splitlines()) == len(original.splitlines())
    assert "grpc_pass grpc://authsvc;" in text
    drained = site_config(
        ["127.0.0.1:1111", "127.0.0.1:2222"], 3333, down=frozenset({"127.0.0.1:1111"})
    )
    assert "server 127.0.0.1:1111 max_fails=1 fail_timeout=5s down;" in drained
    assert "server 127.0.0.1:2222 max_fails=1 fail_timeout=5s;" in drained


@pytest.mark.parametrize("death", ["kill -9", "SIGTERM after nginx took it out"])
async def test_nginx_spreads_calls_over_both_replicas_and_survives_one_dying(
    database_url: str, tmp_path: Path, death: str
) -> None:
    env = _server_env(database_url, tmp_path)
    _create_user(env, "erin")
    with replicas(env, 2) as pair:
        doomed, survivor = pair
        with nginx([r.address for r in pair], tmp_path / "nginx") as proxy:
            # One target, one HTTP/2 connection from the client: nginx balances each call.
            async with AuthClient(target=f"127.0.0.1:{proxy.port}") as auth:
                token = (await auth.issue("erin", PASSWORD)).access_token

                async def die() -> None:
                    _assert_both_answered(pair)
                    if death == "kill -9":
                        await asyncio.to_thread(doomed.kill)
                    else:
                        proxy.take_out(doomed.address)
                        # nginx's new workers take over; the old ones finish the calls
                        # they hold, then close their connections.
                        await _until_no_calls_reach(doomed)
                        doomed.process.terminate()

                before = survivor.calls()
                result = await validate_load(
                    auth, token, concurrency=16, before=1.5, after=2.5, midway=die
                )
        if death != "kill -9":
            assert await asyncio.to_thread(doomed.process.wait, 30) == 0
        assert result.failures == []
        assert result.succeeded_after_midway > 100
        assert survivor.calls() - before >= result.succeeded_after_midway


def _assert_both_answered(pair: list[Replica]) -> None:
    counts = [r.calls() for r in pair]
    # Round robin per call: neither replica is starved (each has well over a tenth).
    assert min(counts) > 0.1 * sum(counts), counts


async def _until_no_calls_reach(replica: Replica) -> None:
    """Wait (liveness bound only) until a replica's Validate count stops moving."""
    async with asyncio.timeout(15):
        last = await asyncio.to_thread(replica.calls)
        while True:
            await asyncio.sleep(0.3)
            now = await asyncio.to_thread(replica.calls)
            if now == last:
                return
            last = now
