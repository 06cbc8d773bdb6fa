"""GetJwks publishes public keys only, each marked the same way whatever its algorithm
(outside-in review: only the RS256 JWK carried `key_ops`, pyjwt's RSA export adding it).

RFC 7517 §4.3: `use` and `key_ops` SHOULD NOT both be given; every key says `use: sig`
(what JOSE libraries read) and nothing else about its use. The members are exactly the
public ones RFC 7518 §6 / RFC 8037 §2 define for its key type, so no private member (or
anything else) can ride along, in new keys or in keys stored before this rule.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from authsvc_client.gen.auth.v1 import auth_pb2

from service.domain.keys import generate_signing_key, open_signing_key
from service.secrets_box import SecretBox
from service.settings import SIGNING_ALGORITHMS
from tests.live_server import TEST_KEK, ServerFactory

PUBLIC_MEMBERS = {
    "OKP": {"kty", "crv", "x"},
    "EC": {"kty", "crv", "x", "y"},
    "RSA": {"kty", "n", "e"},
}
EXPECTED_KTY = {"EdDSA": "OKP", "ES256": "EC", "RS256": "RSA"}
ABOUT_THE_KEY = {"kid", "alg", "use"}


def assert_public_signing_jwk(jwk: dict[str, Any], alg: str) -> None:
    assert jwk["kty"] == EXPECTED_KTY[alg], jwk
    assert set(jwk) == PUBLIC_MEMBERS[jwk["kty"]] | ABOUT_THE_KEY, sorted(jwk)
    assert (jwk["alg"], jwk["use"]) == (alg, "sig")


def test_every_signing_algorithm_is_covered() -> None:
    assert set(SIGNING_ALGORITHMS) == set(EXPECTED_KTY)  # a new algorithm joins these tests


@pytest.mark.filterwarnings("ignore:EdDSA is deprecated")
@pytest.mark.parametrize("alg", SIGNING_ALGORITHMS)
async def test_every_algorithms_jwk_is_public_and_marked_for_signatures_alike(
    server_factory: ServerFactory, alg: str
) -> None:
    server = await server_factory(signing_alg=alg)
    jwks = json.loads((await server.stub.GetJwks(auth_pb2.GetJwksRequest())).jwks_json)
    assert set(jwks) == {"keys"} and jwks["keys"], jwks
    for jwk in jwks["keys"]:
        assert_public_signing_jwk(jwk, alg)


@pytest.mark.parametrize("alg", SIGNING_ALGORITHMS)
def test_a_stored_jwk_with_other_members_is_published_with_the_public_ones_only(
    alg: str,
) -> None:
    """Keys stored before the rule (RS256 ones carry `key_ops`), or a row someone edited,
    are published from the key itself: nothing of the stored JSON beyond it."""
    box = SecretBox(TEST_KEK)
    record = generate_signing_key(alg, box, datetime.now(UTC))
    stored: dict[str, Any] = {
        **record.public_jwk,
        "key_ops": ["verify"],
        "d": "AAAA",
        "x5u": "https://x.test",
    }
    key = open_signing_key(dataclasses.replace(record, public_jwk=stored), box)
    assert_public_signing_jwk(key.public_jwk, alg)
    assert key.public_jwk["kid"] == record.kid
