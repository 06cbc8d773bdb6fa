"""Transport security and caller authentication against the real server.

TLS (AUTH_TLS_CERT/KEY), mutual TLS (AUTH_TLS_CLIENT_CA), and the caller check of
AUTH_CALLER_AUTH with AUTH_SERVICE_TOKENS_FILE (client-certificate names and service
tokens), plus the parsing of that file. Every certificate is made here with
`cryptography`: a CA, a server certificate for localhost, client certificates the CA
signed, and a client certificate from another CA that only shares the first one's name.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import asyncpg
import grpc
import pytest
from authsvc_client.client import AuthClient, AuthServiceError
from authsvc_client.gen.auth.v1 import admin_pb2, admin_pb2_grpc, auth_pb2, auth_pb2_grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.callers import CertificateName, ServiceDirectory
from service.clock import ManualClock
from service.database import create_pool
from service.server import start_server
from service.settings import Settings, SettingsError
from service.store.revocation_feed import LISTENER_APPLICATION_NAME
from tests.helpers import assert_error
from tests.live_server import PASSWORD, LiveServer, ServerFactory

CALL_TIMEOUT = 5.0
CA_NAME = "authsvc test CA"
ORDERS_CN = "orders.internal"
OPS_CN = "ops.internal"


# --- certificates ---------------------------------------------------------------------


@dataclass(frozen=True)
class KeyPair:
    """A PEM certificate and its PEM private key, also written to files."""

    cert_pem: bytes
    key_pem: bytes
    cert_path: Path
    key_path: Path


@dataclass(frozen=True)
class Pki:
    ca: KeyPair
    server: KeyPair
    clients: dict[str, KeyPair]
    """Client certificates by short name: orders, ops and stranger (signed by the CA),
    ops-san (the CA's, naming ops.internal only as a subject alternative name), and
    rogue (CN ops.internal, from another CA with the same name as ours)."""


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(
    directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> KeyPair:
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = _pem_key(key)
    cert_path = directory / f"{stem}.pem"
    key_path = directory / f"{stem}-key.pem"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key_pem)
    key_path.chmod(0o600)
    return KeyPair(cert_pem, key_pem, cert_path, key_path)


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
    )


@dataclass(frozen=True)
class _Authority:
    name: x509.Name
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, common_name: str) -> _Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        name = _name(common_name)
        cert = (
            _builder(name, name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(name, key, cert)

    def issue(
        self,
        common_name: str,
        *,
        usage: x509.ObjectIdentifier,
        alt_names: list[x509.GeneralName] | None = None,
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            _builder(_name(common_name), self.name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if alt_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        return builder.sign(self.key, hashes.SHA256()), key


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca = _Authority.create(CA_NAME)
    # Same subject name as the real CA: only the signature tells them apart.
    rogue_ca = _Authority.create(CA_NAME)
    server = ca.issue(
        "localhost",
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        alt_names=[
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
        ],
    )
    client = ExtendedKeyUsageOID.CLIENT_AUTH
    clients = {
        "orders": ca.issue(ORDERS_CN, usage=client),
        "ops": ca.issue(OPS_CN, usage=client),
        "stranger": ca.issue("stranger.internal", usage=client),
        "ops-san": ca.issue("console-7", usage=client, alt_names=[x509.DNSName(OPS_CN)]),
        "rogue": rogue_ca.issue(OPS_CN, usage=client),
    }
    return Pki(
        ca=_write(directory, "ca", ca.cert, ca.key),
        server=_write(directory, "server", *server),
        clients={name: _write(directory, name, *pair) for name, pair in clients.items()},
    )


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def tls_credentials(
    pki: Pki, client: str | None = None, *, root: bytes | None = None
) -> grpc.ChannelCredentials:
    pair = None if client is None else pki.clients[client]
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert_pem if root is None else root,
        private_key=None if pair is None else pair.key_pem,
        certificate_chain=None if pair is None else pair.cert_pem,
    )


def tls_channel(
    live: LiveServer, pki: Pki, client: str | None = None, *, root: bytes | None = None
) -> grpc.aio.Channel:
    """A TLS channel to the server by its certificate's name (LiveServer.channel is
    plaintext)."""
    return grpc.aio.secure_channel(
        f"localhost:{live.running.port}", tls_credentials(pki, client, root=root)
    )


def auth_stub(channel: grpc.aio.Channel) -> auth_pb2_grpc.AuthServiceAsyncStub:
    return auth_pb2_grpc.AuthServiceStub(channel)


def admin_stub(channel: grpc.aio.Channel) -> admin_pb2_grpc.AdminServiceAsyncStub:
    return admin_pb2_grpc.AdminServiceStub(channel)


async def issue(stub: auth_pb2_grpc.AuthServiceAsyncStub, username: str) -> auth_pb2.TokenPair:
    response = await stub.Issue(
        auth_pb2.IssueRequest(
            password=auth_pb2.PasswordCredentials(username=username, password=PASSWORD)
        ),
        timeout=CALL_TIMEOUT,
    )
    return response.tokens


async def validate(
    stub: auth_pb2_grpc.AuthServiceAsyncStub,
    token: str,
    metadata: tuple[tuple[str, str], ...] = (),
) -> auth_pb2.ValidateResponse:
    return await stub.Validate(
        auth_pb2.ValidateRequest(access_token=token), timeout=CALL_TIMEOUT, metadata=metadata
    )


async def list_keys(
    stub: admin_pb2_grpc.AdminServiceAsyncStub, metadata: tuple[tuple[str, str], ...] = ()
) -> admin_pb2.ListSigningKeysResponse:
    return await stub.ListSigningKeys(
        admin_pb2.ListSigningKeysRequest(), timeout=CALL_TIMEOUT, metadata=metadata
    )


def error_text(error: grpc.aio.AioRpcError) -> str:
    """Everything a failed call shows its caller: message, debug string, trailers."""
    trailers = " ".join(
        value.decode("latin-1") if isinstance(value, bytes) else value
        for _, value in error.trailing_metadata() or ()
    )
    return f"{error.details()} {error.debug_error_string()} {error} {trailers}"


async def actors(live: LiveServer, kind: str) -> list[str | None]:
    """The actor recorded with each security event of `kind`, oldest first."""
    rows = await live.pool.fetch(
        "SELECT detail->>'actor' AS actor FROM security_events WHERE kind = $1 ORDER BY id",
        kind,
    )
    return [row["actor"] for row in rows]


def bearer(secret: str, scheme: str = "Bearer") -> tuple[tuple[str, str], ...]:
    return (("authorization", f"{scheme} {secret}"),)


# --- TLS --------------------------------------------------------------------------------


async def test_tls_serves_auth_admin_and_health_to_a_client_that_trusts_the_ca(
    server_factory: ServerFactory, pki: Pki
) -> None:
    live = await server_factory(tls_cert=pki.server.cert_path, tls_key=pki.server.key_path)
    await live.create_user("tess")
    async with tls_channel(live, pki) as channel:
        stub = auth_stub(channel)
        pair = await issue(stub, "tess")
        check = await validate(stub, pair.access_token)
        assert check.valid
        assert check.session_id == pair.session_id
        jwks = await stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=CALL_TIMEOUT)
        assert json.loads(jwks.jwks_json)["keys"]
        keys = await list_keys(admin_stub(channel))
        assert len(keys.keys) >= 1
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "auth.v1.AuthService"):
            reply = await health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_tls_refuses_plaintext_and_clients_that_do_not_trust_it(
    server_factory: ServerFactory, pki: Pki
) -> None:
    live = await server_factory(tls_cert=pki.server.cert_path, tls_key=pki.server.key_path)
    await live.create_user("paula")
    async with grpc.aio.insecure_channel(f"localhost:{live.running.port}") as plain:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await issue(auth_stub(plain), "paula")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    shown = error_text(caught.value)
    assert PASSWORD not in shown
    for pem in (pki.server.key_pem, pki.ca.key_pem):
        body = b"".join(pem.splitlines()[1:-1]).decode()
        assert body[:40] not in shown
        assert body[-40:] not in shown

    # A TLS client that trusts another CA (of the same name) refuses the server.
    async with tls_channel(live, pki, root=pki.clients["rogue"].cert_pem) as distrustful:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await issue(auth_stub(distrustful), "paula")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert PASSWORD not in error_text(caught.value)


async def test_mtls_requires_a_client_certificate_from_the_configured_ca(
    server_factory: ServerFactory, pki: Pki
) -> None:
    live = await server_factory(
        tls_cert=pki.server.cert_path,
        tls_key=pki.server.key_path,
        tls_client_ca=pki.ca.cert_path,
    )
    await live.create_user("mona")
    for client in (None, "rogue"):
        async with tls_channel(live, pki, client) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await issue(auth_stub(channel), "mona")
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, client
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await auth_stub(channel).GetJwks(auth_pb2.GetJwksRequest(), timeout=CALL_TIMEOUT)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, client
    async with tls_channel(live, pki, "orders") as channel:
        pair = await issue(auth_stub(channel), "mona")
        assert (await validate(auth_stub(channel), pair.access_token)).valid


# --- callers by certificate -------------------------------------------------------------


@pytest.fixture
def cert_tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "service-tokens"
    path.write_text(
        "# name  groups          credential\n"
        f"orders  validate        cert:cn:{ORDERS_CN}\n"
        "\n"
        f"ops     admin,validate  cert:cn:{OPS_CN}\n"
        f"ops-san admin,validate  cert:dns:{OPS_CN}\n"
    )
    return path


@pytest.fixture
async def cert_guarded(
    server_factory: ServerFactory, pki: Pki, cert_tokens_file: Path
) -> LiveServer:
    return await server_factory(
        tls_cert=pki.server.cert_path,
        tls_key=pki.server.key_path,
        tls_client_ca=pki.ca.cert_path,
        caller_auth=frozenset({"validate", "admin"}),
        service_tokens_file=cert_tokens_file,
    )


async def test_certificate_callers_get_only_their_groups(
    cert_guarded: LiveServer, pki: Pki
) -> None:
    live = cert_guarded
    await live.create_user("carl")
    async with tls_channel(live, pki, "orders") as orders, tls_channel(live, pki, "ops") as ops:
        pair = await issue(auth_stub(orders), "carl")
        assert (await validate(auth_stub(orders), pair.access_token)).valid
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await list_keys(admin_stub(orders))
        assert_error(caught.value, grpc.StatusCode.PERMISSION_DENIED, "SERVICE_NOT_PERMITTED")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await admin_stub(orders).RotateSigningKey(
                admin_pb2.RotateSigningKeyRequest(), timeout=CALL_TIMEOUT
            )
        assert_error(caught.value, grpc.StatusCode.PERMISSION_DENIED, "SERVICE_NOT_PERMITTED")

        assert (await validate(auth_stub(ops), pair.access_token)).valid
        assert len((await list_keys(admin_stub(ops))).keys) >= 1
    # Refused calls never ran; the one that ran names the service that made it.
    assert await actors(live, "signing_keys_listed") == ["admin:ops"]
    assert len(await live.pool.fetch("SELECT kid FROM signing_keys")) == 1


async def test_end_user_calls_need_no_service_identity(cert_guarded: LiveServer, pki: Pki) -> None:
    """Issue, Refresh, Revoke and GetJwks stay open: a user's own flow works through a
    connection whose certificate (orders) may not use the admin API."""
    live = cert_guarded
    await live.create_user("uma")
    async with tls_channel(live, pki, "orders") as channel:
        stub = auth_stub(channel)
        pair = await issue(stub, "uma")
        refreshed = (
            await stub.Refresh(
                auth_pb2.RefreshRequest(refresh_token=pair.refresh_token), timeout=CALL_TIMEOUT
            )
        ).tokens
        assert refreshed.session_id == pair.session_id
        jwks = await stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=CALL_TIMEOUT)
        assert json.loads(jwks.jwks_json)["keys"]
        revoked = await stub.Revoke(
            auth_pb2.RevokeRequest(session_id=pair.session_id),
            timeout=CALL_TIMEOUT,
            metadata=bearer(refreshed.access_token),
        )
        assert revoked.revoked_sessions == 1
        check = await validate(stub, refreshed.access_token)
        assert not check.valid
        assert check.error == auth_pb2.VALIDATION_ERROR_REVOKED


async def test_certificate_names_are_matched_exactly_by_cn_or_san(
    cert_guarded: LiveServer, pki: Pki
) -> None:
    live = cert_guarded
    await live.create_user("sam")
    async with tls_channel(live, pki, "orders") as orders:
        pair = await issue(auth_stub(orders), "sam")
    # Signed by our CA, but named in no line of the file.
    async with tls_channel(live, pki, "stranger") as stranger:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await validate(auth_stub(stranger), pair.access_token)
        assert_error(caught.value, grpc.StatusCode.UNAUTHENTICATED, "SERVICE_CREDENTIALS_REQUIRED")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await list_keys(admin_stub(stranger))
        assert_error(caught.value, grpc.StatusCode.UNAUTHENTICATED, "SERVICE_CREDENTIALS_REQUIRED")
        # A user's own calls still work for it.
        assert json.loads((await auth_stub(stranger).GetJwks(auth_pb2.GetJwksRequest())).jwks_json)[
            "keys"
        ]
    # ops.internal as a DNS subject alternative name is the cert:dns: line's service (the
    # cert:cn: line of the same text is another: tests/security/test_certificate_names.py).
    async with tls_channel(live, pki, "ops-san") as ops_san:
        assert (await validate(auth_stub(ops_san), pair.access_token)).valid
        assert len((await list_keys(admin_stub(ops_san))).keys) >= 1
    assert await actors(live, "signing_keys_listed") == ["admin:ops-san"]


# --- callers by service token -----------------------------------------------------------


@dataclass(frozen=True)
class TokenSetup:
    live: LiveServer
    orders_secret: str
    billing_secret: str


@pytest.fixture
async def token_guarded(server_factory: ServerFactory, tmp_path: Path) -> TokenSetup:
    orders_secret = secrets.token_urlsafe(30)
    billing_secret = secrets.token_urlsafe(30)
    assert len(orders_secret) == 40
    digest = hashlib.sha256(billing_secret.encode()).hexdigest()
    path = tmp_path / "service-tokens"
    path.write_text(f"orders  validate  token:{orders_secret}\nbilling validate  sha256:{digest}\n")
    live = await server_factory(caller_auth=frozenset({"validate"}), service_tokens_file=path)
    return TokenSetup(live, orders_secret, billing_secret)


async def test_validate_needs_a_known_service_token(token_guarded: TokenSetup) -> None:
    live = token_guarded.live
    orders, billing = token_guarded.orders_secret, token_guarded.billing_secret
    await live.create_user("vera")
    pair = await live.login("vera")  # Issue stays open
    refused = [
        (),
        bearer(secrets.token_urlsafe(30)),
        bearer(orders[:-1]),
        bearer(orders + "x"),
        bearer(hashlib.sha256(billing.encode()).hexdigest()),  # the digest is not the secret
        bearer(orders, scheme="Basic"),
        (("x-authorization", f"Bearer {orders}"),),
    ]
    for metadata in refused:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await validate(live.stub, pair.access_token, metadata)
        assert_error(caught.value, grpc.StatusCode.UNAUTHENTICATED, "SERVICE_CREDENTIALS_REQUIRED")
    for metadata in (
        bearer(orders),
        bearer(billing),  # a sha256: entry
        bearer(orders, scheme="bearer"),
        bearer(billing, scheme="BEARER"),
    ):
        check = await validate(live.stub, pair.access_token, metadata)
        assert check.valid
        assert check.session_id == pair.session_id


async def test_admin_is_not_guarded_when_only_validate_is(token_guarded: TokenSetup) -> None:
    """caller_auth={"validate"} on a loopback address: the admin API is open, and its
    events name no service."""
    live = token_guarded.live
    reply = await list_keys(admin_stub(live.channel))
    assert len(reply.keys) >= 1
    assert await actors(live, "signing_keys_listed") == ["admin:anonymous"]


async def test_service_tokens_never_reach_logs_or_errors(
    token_guarded: TokenSetup, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    live = token_guarded.live
    orders, billing = token_guarded.orders_secret, token_guarded.billing_secret
    await live.create_user("lola")
    pair = await live.login("lola")
    assert (await validate(live.stub, pair.access_token, bearer(orders))).valid
    assert (await validate(live.stub, pair.access_token, bearer(billing))).valid
    shown: list[str] = []
    wrong = orders[:-4] + "abcd"
    for metadata in (bearer(wrong), bearer(billing, scheme="Basic"), ()):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await validate(live.stub, pair.access_token, metadata)
        assert_error(caught.value, grpc.StatusCode.UNAUTHENTICATED, "SERVICE_CREDENTIALS_REQUIRED")
        shown.append(error_text(caught.value))
    await asyncio.sleep(0.05)  # let the server's log lines land
    refusals = [r for r in caplog.records if "SERVICE_CREDENTIALS_REQUIRED" in r.getMessage()]
    assert refusals, "refused calls are logged"
    logged = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    for secret in (orders, billing, wrong):
        for fragment in (secret, secret[:16], secret[-16:]):
            assert fragment not in logged
            assert all(fragment not in text for text in shown)


# --- the tokens file --------------------------------------------------------------------


SECRET = "S3cr3t-" + "q" * 33  # 40 characters
SHORT = "Sh0rt-" + "w" * 25  # 31 characters


@pytest.mark.parametrize(
    ("bad_line", "secret"),
    [
        pytest.param(f"orders validate token:{SHORT}", SHORT, id="short-token"),
        pytest.param(f"orders validate,superuser token:{SECRET}", SECRET, id="unknown-group"),
        pytest.param(f"orders Validate token:{SECRET}", SECRET, id="group-case"),
        pytest.param(f"orders validate,validate token:{SECRET}", SECRET, id="repeated-group"),
        pytest.param(f"orders validate, token:{SECRET}", SECRET, id="empty-group"),
        pytest.param(f"orders validate password:{SECRET}", SECRET, id="bad-kind"),
        pytest.param(f"orders validate {SECRET}", SECRET, id="no-kind"),
        pytest.param(f"first validate token:{SECRET}", SECRET, id="duplicate-name"),
        pytest.param(f"orders validate token:{SECRET} extra", SECRET, id="four-fields"),
        pytest.param(f"orders token:{SECRET}", SECRET, id="two-fields"),
        pytest.param(f"orders validate token: {SECRET}", SECRET, id="space-after-kind"),
        pytest.param(f"bad/name validate token:{SECRET}", SECRET, id="bad-name"),
        pytest.param("orders validate sha256:" + "AB" * 32, "AB" * 32, id="upper-hex"),
        pytest.param("orders validate sha256:" + "ab" * 31, "ab" * 31, id="short-hex"),
        pytest.param("orders validate cert:", SECRET, id="empty-cert"),
        pytest.param("orders validate cert:orders.internal", SECRET, id="bare-cert-name"),
    ],
)
def test_a_bad_tokens_file_line_is_named_without_its_secret(
    tmp_path: Path, bad_line: str, secret: str
) -> None:
    path = tmp_path / "service-tokens"
    good = "first validate token:" + "g" * 32
    path.write_text(f"# services\n{good}\n\n   # indented comment\n{bad_line}\n")
    with pytest.raises(SettingsError) as caught:
        ServiceDirectory.from_file(path)
    message = str(caught.value)
    assert message.startswith("AUTH_SERVICE_TOKENS_FILE: line 5: "), message
    assert "\n" not in message
    assert secret not in message
    assert secret[:12] not in message


def test_comments_and_blank_lines_are_ignored(tmp_path: Path) -> None:
    digest = hashlib.sha256(SECRET.encode()).hexdigest()
    path = tmp_path / "service-tokens"
    path.write_text(
        "# name groups credential\n"
        "\n"
        "   \n"
        "\t# token:tooshort is only a comment\n"
        f"orders validate token:{'o' * 32}\n"
        f"billing validate sha256:{digest}\n"
        "# ops admin token:short\n"
        "ops-console admin,validate cert:dns:ops.internal\n"
        "\n"
    )
    directory = ServiceDirectory.from_file(path)
    assert len(directory) == 3
    orders = directory.by_token("o" * 32)
    assert orders is not None
    assert (orders.name, orders.groups) == ("orders", frozenset({"validate"}))
    billing = directory.by_token(SECRET)
    assert billing is not None
    assert billing.name == "billing"
    ops = directory.by_certificate(
        [CertificateName("cn", "someone-else"), CertificateName("dns", "ops.internal")]
    )
    assert ops is not None
    assert (ops.name, ops.groups) == ("ops-console", frozenset({"admin", "validate"}))
    assert directory.by_certificate([CertificateName("dns", "ops")]) is None
    assert directory.by_certificate([CertificateName("cn", "ops.internal")]) is None
    assert directory.by_certificate([]) is None
    # A cert: entry is not a token, nor a token a certificate name.
    assert directory.by_token("ops.internal") is None
    assert directory.by_token("dns:ops.internal") is None
    assert directory.by_certificate([CertificateName("cn", "o" * 32)]) is None


def test_by_token_compares_every_entry_in_constant_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = {name: secrets.token_urlsafe(30) for name in ("alpha", "beta", "gamma")}
    path = tmp_path / "service-tokens"
    path.write_text(
        "".join(f"{name} validate token:{secret}\n" for name, secret in tokens.items())
        + "delta admin cert:dns:delta.internal\n"
    )
    directory = ServiceDirectory.from_file(path)
    compared: list[int] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(1)
        return real(a, b)

    # callers.py looks hmac.compare_digest up at each call.
    monkeypatch.setattr(hmac, "compare_digest", counting)
    for name, secret in tokens.items():
        compared.clear()
        found = directory.by_token(secret)
        assert found is not None
        assert found.name == name
        assert len(compared) == 3, name  # every token entry, whichever matched
    compared.clear()
    assert directory.by_token(secrets.token_urlsafe(30)) is None
    assert len(compared) == 3
    assert directory.by_token("") is None
    assert directory.by_token(tokens["gamma"] + " ") is None


# --- start-up ---------------------------------------------------------------------------


@pytest.fixture
def bad_tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "bad-service-tokens"
    path.write_text(f"orders validate token:{SHORT}\n")
    return path


@pytest.fixture
async def leftover_tasks() -> AsyncIterator[list[asyncio.Task[object]]]:
    """Tasks a failed start left behind (put here by the test), cancelled at its end."""
    found: list[asyncio.Task[object]] = []
    yield found
    for task in found:
        task.cancel()
    await asyncio.gather(*found, return_exceptions=True)


def new_tasks(before: set[asyncio.Task[object]]) -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() - before if t is not asyncio.current_task()]


async def test_a_refused_start_up_leaves_nothing_running(
    settings: Settings,
    clock: ManualClock,
    bad_tokens_file: Path,
    database_url: str,
    leftover_tasks: list[asyncio.Task[object]],
) -> None:
    """A bad tokens file stops start_server with a message naming the line (not the
    secret), before it leaves a revocation listener, its poll or a database connection
    behind (the caller has nothing to stop)."""
    bad = replace(
        settings, caller_auth=frozenset({"validate"}), service_tokens_file=bad_tokens_file
    )
    before = set(asyncio.all_tasks())
    pool = await create_pool(database_url, bad)
    try:
        with pytest.raises(SettingsError) as caught:
            await start_server(bad, dsn=database_url, pool=pool, clock=clock)
        assert str(caught.value).startswith("AUTH_SERVICE_TOKENS_FILE: line 1: ")
        assert SHORT not in str(caught.value)
        await asyncio.sleep(0.3)  # time for a leaked listener to connect
        leftover_tasks.extend(new_tasks(before))
        conn = await asyncpg.connect(database_url)
        try:
            listeners = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name = $1 AND datname = current_database()",
                LISTENER_APPLICATION_NAME,
            )
        finally:
            await conn.close()
    finally:
        await pool.close()
    running = sorted(
        t.get_name()
        for t in leftover_tasks
        if not t.done() and t.get_name() in {"revocation-listener", "revocation-poll", "janitor"}
    )
    assert (running, listeners) == ([], 0), "start_server failed but left these running"


# --- the Python client ------------------------------------------------------------------


async def test_python_client_uses_tls_and_its_service_token(
    server_factory: ServerFactory, pki: Pki, tmp_path: Path
) -> None:
    token = secrets.token_urlsafe(30)
    path = tmp_path / "service-tokens"
    path.write_text(f"orders validate token:{token}\n")
    live = await server_factory(
        tls_cert=pki.server.cert_path,
        tls_key=pki.server.key_path,
        caller_auth=frozenset({"validate"}),
        service_tokens_file=path,
    )
    await live.create_user("cleo")
    target = f"localhost:{live.running.port}"
    async with AuthClient(
        target=target, credentials=tls_credentials(pki), service_token=token
    ) as orders:
        assert token not in repr(orders)
        pair = await orders.issue("cleo", PASSWORD)
        check = await orders.validate(pair.access_token)
        assert check.valid
        assert check.session_id == pair.session_id
        assert (await orders.get_jwks()).keys
    async with AuthClient(target=target, credentials=tls_credentials(pki)) as anonymous:
        # End-user calls work without a service token ...
        assert (await anonymous.refresh(pair.refresh_token)).session_id == pair.session_id
        # ... Validate does not.
        with pytest.raises(AuthServiceError) as caught:
            await anonymous.validate(pair.access_token)
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.reason == "SERVICE_CREDENTIALS_REQUIRED"
    assert token not in str(caught.value)
    async with AuthClient(
        target=target, credentials=tls_credentials(pki), service_token=secrets.token_urlsafe(30)
    ) as impostor:
        with pytest.raises(AuthServiceError) as caught:
            await impostor.validate(pair.access_token)
    assert caught.value.reason == "SERVICE_CREDENTIALS_REQUIRED"
