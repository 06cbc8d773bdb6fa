"""The JWK Set the client reads (`KeySet`): keys of every algorithm pyjwt offers; only
authsvc's public signature-verifying keys are used. RFC 7517 §4.2/§4.3: a key whose
`use` or `key_ops` says it is not for verifying signatures is not used (`key_ops` was
ignored), nor is a JWK with a private member."""

from __future__ import annotations

import json
from typing import Any

import pytest
from authsvc_client.token_check import KeySet
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm, RSAPSSAlgorithm

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
CURVES = {"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1(), "ES512": ec.SECP521R1()}
CURVES["ES256K"] = ec.SECP256K1()


def private_key(alg: str) -> Any:
    if alg in CURVES:
        return ec.generate_private_key(CURVES[alg])
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    if alg == "Ed448":
        return ed448.Ed448PrivateKey.generate()
    return RSA_KEY


def jwk(alg: str, *, private: bool = False, **members: Any) -> dict[str, Any]:
    key = private_key(alg)
    exporter: Any = (
        ECAlgorithm
        if alg in CURVES
        else OKPAlgorithm
        if alg in ("EdDSA", "Ed448")
        else RSAPSSAlgorithm
        if alg.startswith("PS")
        else RSAAlgorithm
    )
    exported = exporter.to_jwk(key if private else key.public_key(), as_dict=True)
    exported.pop("key_ops", None)  # pyjwt's RSA export adds one; each case says its own
    return {**exported, "kid": f"kid-{alg}", "alg": "EdDSA" if alg == "Ed448" else alg, **members}


def used(*keys: dict[str, Any]) -> set[str]:
    return set(KeySet(json.dumps({"keys": list(keys)})).kids)


AUTHSVC_SIGNS_WITH = ("EdDSA", "ES256", "RS256")
OTHERS = ("ES384", "ES512", "ES256K", "Ed448", "RS384", "RS512", "PS256", "PS384", "PS512")


@pytest.mark.parametrize("alg", AUTHSVC_SIGNS_WITH)
@pytest.mark.parametrize(
    "members",
    [{"use": "sig"}, {"key_ops": ["verify"]}, {"use": "sig", "key_ops": ["verify"]}, {}],
    ids=["use", "key_ops", "both", "neither"],
)
def test_authsvcs_public_verifying_keys_are_used(alg: str, members: dict[str, Any]) -> None:
    assert used(jwk(alg, **members)) == {f"kid-{alg}"}


@pytest.mark.parametrize("alg", AUTHSVC_SIGNS_WITH)
@pytest.mark.parametrize(
    "members",
    [
        {"use": "enc"},
        {"key_ops": ["sign"]},
        {"key_ops": ["encrypt", "wrapKey"]},
        {"key_ops": []},
        {"key_ops": "verify"},  # not a list
        {"use": "sig", "key_ops": ["sign"]},  # inconsistent (RFC 7517 §4.3: MUST agree)
    ],
    ids=["use-enc", "sign-only", "encrypt", "no-ops", "ops-not-a-list", "inconsistent"],
)
def test_a_key_not_for_verifying_is_not_used(alg: str, members: dict[str, Any]) -> None:
    assert used(jwk(alg, **members)) == set()


@pytest.mark.parametrize("alg", AUTHSVC_SIGNS_WITH)
def test_a_jwk_with_private_members_is_not_used(alg: str) -> None:
    assert used(jwk(alg, private=True, use="sig")) == set()


@pytest.mark.parametrize("alg", OTHERS)
def test_keys_of_algorithms_authsvc_does_not_sign_with_are_skipped(alg: str) -> None:
    key_set = KeySet(json.dumps({"keys": [jwk(alg, use="sig"), jwk("ES256", use="sig")]}))
    assert key_set.kids == {"kid-ES256"}
    assert key_set.skipped == 1
