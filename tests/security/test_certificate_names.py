"""A `cert:` line of AUTH_SERVICE_TOKENS_FILE names one kind of certificate name, and only
that kind matches: `cert:dns:NAME` a DNS subject alternative name, `cert:uri:URI` a URI one
(SPIFFE ids), `cert:cn:NAME` the subject's common name. Never "any name in the certificate":
a client certificate whose URI SAN, e-mail SAN or CN spells a configured DNS name is a
stranger. The old bare `cert:NAME` stops start-up with a message saying what to write.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import pytest
from authsvc_client.gen.auth.v1 import auth_pb2, auth_pb2_grpc
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from service.api.callers import CertificateName, ServiceDirectory
from service.settings import SettingsError
from tests.helpers import assert_error
from tests.live_server import ServerFactory
from tests.test_transport_security import KeyPair, _Authority, _write

CLIENT = ExtendedKeyUsageOID.CLIENT_AUTH
SERVICES_FILE = """\
# name   groups    credential
orders   validate  cert:dns:orders.internal
billing  validate  cert:uri:spiffe://example.org/billing
legacy   validate  cert:cn:legacy.internal
"""


def client_certificates(directory: Path) -> tuple[KeyPair, KeyPair, dict[str, KeyPair]]:
    """The CA, the server's certificate, and client certificates by name, all from one CA."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _Authority.create("authsvc names CA")
    server = ca.issue(
        "localhost",
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        alt_names=[x509.DNSName("localhost")],
    )
    dns, uri = x509.DNSName, x509.UniformResourceIdentifier
    clients: dict[str, tuple[str, list[x509.GeneralName]]] = {
        # Accepted, each by the kind of name its line asks for.
        "orders by DNS SAN": ("whatever", [dns("orders.internal")]),
        "orders by DNS SAN in capitals": ("whatever", [dns("Orders.Internal")]),
        "billing by URI SAN": ("whatever", [uri("spiffe://example.org/billing")]),
        "legacy by CN": ("legacy.internal", []),
        # Refused: the right text in the wrong kind of name.
        "URI SAN spelling the DNS name": ("whatever", [uri("orders.internal")]),
        "e-mail SAN spelling the DNS name": ("whatever", [x509.RFC822Name("orders.internal")]),
        "CN spelling the DNS name": ("orders.internal", []),
        "DNS SAN spelling the URI": ("whatever", [dns("spiffe://example.org/billing")]),
        "CN spelling the URI": ("spiffe://example.org/billing", []),
        "DNS SAN spelling the CN": ("whatever", [dns("legacy.internal")]),
        "URI SAN spelling the CN": ("whatever", [uri("legacy.internal")]),
        # Refused: names two services at once (which would it be?).
        "two services in one certificate": ("legacy.internal", [dns("orders.internal")]),
    }
    written = {
        name: _write(directory, f"client-{i}", *ca.issue(cn, usage=CLIENT, alt_names=alt or None))
        for i, (name, (cn, alt)) in enumerate(clients.items())
    }
    return _write(directory, "ca", ca.cert, ca.key), _write(directory, "server", *server), written


async def test_certificate_names_match_only_the_configured_kind(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    ca, server_pair, clients = client_certificates(tmp_path / "pki")
    services = tmp_path / "services"
    services.write_text(SERVICES_FILE)
    live = await server_factory(
        tls_cert=server_pair.cert_path,
        tls_key=server_pair.key_path,
        tls_client_ca=ca.cert_path,
        caller_auth=frozenset({"validate"}),
        service_tokens_file=services,
    )
    outcomes: dict[str, str] = {}
    for name, pair in clients.items():
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca.cert_pem,
            private_key=pair.key_pem,
            certificate_chain=pair.cert_pem,
        )
        async with grpc.aio.secure_channel(f"localhost:{live.running.port}", credentials) as ch:
            stub = auth_pb2_grpc.AuthServiceStub(ch)
            try:
                verdict = await stub.Validate(
                    auth_pb2.ValidateRequest(access_token="not.a.token"), timeout=5
                )
                assert not verdict.valid
                outcomes[name] = "accepted"
            except grpc.aio.AioRpcError as error:
                assert_error(error, grpc.StatusCode.UNAUTHENTICATED, "SERVICE_CREDENTIALS_REQUIRED")
                outcomes[name] = "refused"
    accepted = [
        "orders by DNS SAN",
        "orders by DNS SAN in capitals",
        "billing by URI SAN",
        "legacy by CN",
    ]
    assert outcomes == {name: "accepted" if name in accepted else "refused" for name in clients}


# The file


def directory_of(tmp_path: Path, text: str) -> ServiceDirectory:
    path = tmp_path / "services"
    path.write_text(text)
    return ServiceDirectory.from_file(path)


@pytest.mark.parametrize(
    "credential",
    ["cert:ops.internal", "cert:spiffe://example.org/ops", "cert:DNS:ops.internal", "cert:san:x"],
)
def test_a_bare_or_unknown_cert_kind_stops_start_up(tmp_path: Path, credential: str) -> None:
    """The old `cert:NAME` matched any name in the certificate; it is refused, not silently
    given a narrower meaning, and the message says what to write instead."""
    with pytest.raises(SettingsError) as caught:
        directory_of(tmp_path, f"# services\nops admin {credential}\n")
    message = str(caught.value)
    assert message.startswith("AUTH_SERVICE_TOKENS_FILE: line 2: "), message
    assert "cert:dns:" in message and "cert:uri:" in message and "cert:cn:" in message


@pytest.mark.parametrize(
    "credential",
    [
        "cert:dns:",
        "cert:dns:*.internal",
        "cert:dns:ops..internal",
        "cert:dns:ops.internal/x",
        "cert:uri:",
        "cert:uri:no-scheme",
        "cert:cn:",
    ],
)
def test_a_malformed_certificate_name_stops_start_up(tmp_path: Path, credential: str) -> None:
    with pytest.raises(SettingsError) as caught:
        directory_of(tmp_path, f"ops admin {credential}\n")
    assert str(caught.value).startswith("AUTH_SERVICE_TOKENS_FILE: line 1: ")


def test_one_credential_names_one_service(tmp_path: Path) -> None:
    """Two lines with the same certificate name, or the same token, would make the caller
    whichever line the lookup met last: refused at start-up, naming the first line's
    service (never the secret)."""
    secret = "t" * 40
    digest = hashlib.sha256(secret.encode()).hexdigest()
    for text in (
        "a validate cert:dns:ops.internal\nb admin cert:dns:OPS.internal\n",
        "a validate cert:cn:ops\nb admin cert:cn:ops\n",
        f"a validate token:{secret}\nb admin token:{secret}\n",
        f"a validate token:{secret}\nb admin sha256:{digest}\n",
    ):
        with pytest.raises(SettingsError) as caught:
            directory_of(tmp_path, text)
        message = str(caught.value)
        assert message.startswith("AUTH_SERVICE_TOKENS_FILE: line 2: "), message
        assert " a" in message
        assert secret not in message
    # The same name as different kinds is two different credentials.
    directory = directory_of(
        tmp_path, "a validate cert:dns:ops.internal\nb admin cert:cn:ops.internal\n"
    )
    found = directory.by_certificate([CertificateName("cn", "ops.internal")])
    assert found is not None and found.name == "b"
    found = directory.by_certificate([CertificateName("dns", "ops.internal")])
    assert found is not None and found.name == "a"
    both = [CertificateName("dns", "ops.internal"), CertificateName("cn", "ops.internal")]
    assert directory.by_certificate(both) is None
