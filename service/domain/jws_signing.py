"""The per-token work of signing an access token, done once where it can be: the claims'
JSON encoder, the ECDSA parameters of each key, the random bytes of token ids drawn from
the OS in batches. Each produces what the straightforward code did (json.dumps with compact
separators, pyjwt's raw ECDSA signature with s made low, uuid4().hex)."""

from __future__ import annotations

import json
import json.encoder
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

# json.dumps(value, separators=(",", ":")) builds this encoder anew on every call.
COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))


def _not_serializable(value: object) -> object:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# JSONEncoder.encode builds its C encoder anew on every call too; this one is built once
# (with COMPACT_JSON's settings, minus the circular-reference check that a flat dict of
# strings and numbers has no use for). None where the json module has no C accelerator.
_make_c_encoder: Any = getattr(json.encoder, "c_make_encoder", None)
_C_COMPACT_ENCODER: Callable[[object, int], Sequence[str]] | None = (
    None
    if _make_c_encoder is None
    else _make_c_encoder(
        None,  # no circular-reference check
        _not_serializable,
        json.encoder.encode_basestring_ascii,
        None,  # no indent
        ":",
        ",",
        False,  # sort_keys
        False,  # skipkeys
        True,  # allow_nan
    )
)


def compact_json(value: dict[str, Any]) -> str:
    """`json.dumps(value, separators=(",", ":"))`, the same text."""
    if _C_COMPACT_ENCODER is None:
        return COMPACT_JSON.encode(value)
    return "".join(_C_COMPACT_ENCODER(value, 0))


# A token id is 16 bytes of a buffer this big, refilled from os.urandom when used up.
_RANDOM_BATCH = 4096
_UUID_VARIANT_MASK = ~(0xC000 << 48)
_UUID_VARIANT_RFC4122 = 0x8000 << 48
_UUID_VERSION_MASK = ~(0xF000 << 64)
_UUID_VERSION_4 = 4 << 76

# Bumped in a forked child: a buffer filled before the fork is never used again in both
# processes (the server spawns its workers, but a fork must not repeat ids either).
_forks = 0


def _forked() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_forked)


class TokenIds:
    """Unique token ids in uuid4().hex's format (32 lowercase hex digits, version 4,
    RFC 4122 variant: 122 random bits from the OS CSPRNG), without a getrandom call and a
    UUID object per id."""

    __slots__ = ("_buffer", "_forks", "_offset")

    def __init__(self) -> None:
        self._buffer = b""
        self._offset = 0
        self._forks = _forks

    def next_hex(self) -> str:
        offset = self._offset
        if offset + 16 > len(self._buffer) or self._forks != _forks:
            self._buffer = os.urandom(_RANDOM_BATCH)
            self._forks = _forks
            offset = 0
        self._offset = offset + 16
        value = int.from_bytes(self._buffer[offset : offset + 16], "big")
        value = (value & _UUID_VARIANT_MASK) | _UUID_VARIANT_RFC4122
        value = (value & _UUID_VERSION_MASK) | _UUID_VERSION_4
        return f"{value:032x}"


# Every ECDSA algorithm pyjwt offers (RFC 7518 §3.4, RFC 8812 §3.2 for ES256K).
_ECDSA_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "ES256": hashes.SHA256,
    "ES384": hashes.SHA384,
    "ES512": hashes.SHA512,
    "ES256K": hashes.SHA256,
}


@dataclass(frozen=True, slots=True)
class EcdsaSigner:
    """Signs JWS input with one EC key: the raw r || s form (RFC 7518 §3.4) with s <= n/2,
    as pyjwt's ECAlgorithm.sign followed by the low-s rewrite, from the one DER parse."""

    private_key: ec.EllipticCurvePrivateKey
    algorithm: ec.ECDSA
    order: int
    size: int

    @classmethod
    def for_key(cls, alg: str, private_key: Any, orders: dict[str, int]) -> EcdsaSigner | None:
        """The signer of `private_key` for JWS `alg`; None if it is no EC key or no curve
        and hash this knows (the caller signs through pyjwt then)."""
        if not isinstance(private_key, ec.EllipticCurvePrivateKey) or alg not in _ECDSA_HASHES:
            return None
        order = orders.get(private_key.curve.name)
        if order is None:
            return None
        return cls(
            private_key=private_key,
            algorithm=ec.ECDSA(_ECDSA_HASHES[alg]()),
            order=order,
            size=(private_key.curve.key_size + 7) // 8,
        )

    def sign(self, signing_input: bytes) -> bytes:
        r, s = decode_dss_signature(self.private_key.sign(signing_input, self.algorithm))
        if s > self.order // 2:
            s = self.order - s
        return r.to_bytes(self.size, "big") + s.to_bytes(self.size, "big")
