"""Encryption at rest for private key material (AES-256-GCM under the KEK)."""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import secrets
import stat
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from service.failures import ConfigurationError

_NONCE_BYTES = 12


class KeyDecryptionError(ConfigurationError):
    """Stored key material does not decrypt under this KEK (wrong AUTH_KEK?)."""


class SecretBox:
    """Seals and opens small secrets; `label` is bound as associated data so a
    ciphertext cannot be moved to another row."""

    def __init__(self, kek: bytes) -> None:
        if len(kek) != 32:
            raise ValueError("the key-encryption key must be 32 bytes")
        self._aead = AESGCM(kek)

    def seal(self, plaintext: bytes, *, label: str) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, label.encode())

    def open(self, sealed: bytes, *, label: str) -> bytes:
        nonce, ciphertext = sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:]
        try:
            return self._aead.decrypt(nonce, ciphertext, label.encode())
        except InvalidTag:
            raise KeyDecryptionError(
                f"AUTH_KEK does not open the stored secret {label}: set AUTH_KEK to the key the "
                "database's key material was sealed with (the one the other replicas use)"
            ) from None


def one_repeated_byte(key: bytes) -> bool:
    """Whether `key` is one byte over and over (all zeros, the `"A" * 43 + "="` of a
    placeholder): no key-encryption key, whatever its length."""
    return len(set(key)) <= 1


def load_or_create_kek_file(path: Path) -> bytes:
    """Read the KEK from `path`, creating it (mode 0600) with 32 random bytes if absent.

    The new key is written to a temporary file and linked into place, so a reader
    never sees a partial file and two processes starting together agree on one key.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        return _read_kek_file(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".kek-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        os.chmod(tmp, 0o600)
        with contextlib.suppress(FileExistsError):  # another process won the race
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
    return _read_kek_file(path)


_MAKE_KEK_FILE = "head -c 32 /dev/urandom > FILE && chmod 600 FILE"


def _is_base64_of_32_bytes(content: bytes) -> bool:
    """Whether `content` is what `openssl rand -base64 32` prints (44 characters, and a
    newline): AUTH_KEK's form, written to the file instead of the bytes."""
    try:
        return len(base64.b64decode(content.strip(), validate=True)) == 32
    except (binascii.Error, ValueError):
        return False


def _read_kek_file(path: Path) -> bytes:
    try:
        key = path.read_bytes()
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        raise ConfigurationError(f"{path}: cannot read the KEK file ({exc.strerror})") from None
    if len(key) != 32:
        if _is_base64_of_32_bytes(key):
            raise ConfigurationError(
                f"{path}: the KEK file holds base64 text (AUTH_KEK's form), not the raw 32 "
                f"bytes of a KEK: {_MAKE_KEK_FILE}, or decode this one with base64 -d"
            )
        raise ConfigurationError(
            f"{path}: a KEK file holds the raw 32 bytes of a KEK, this one holds {len(key)}: "
            f"{_MAKE_KEK_FILE}"
        )
    if one_repeated_byte(key):
        raise ConfigurationError(
            f"{path}: the KEK file holds one byte repeated 32 times, a placeholder rather "
            f"than a key: replace it with 32 random bytes ({_MAKE_KEK_FILE}); the signing "
            "keys and refresh-token secret stored in the database were sealed with it and "
            "cannot be opened with a new one (docs/operations.md, The KEK file)"
        )
    if mode & 0o077:
        raise ConfigurationError(f"{path}: the KEK file must not be readable by group or others")
    return key
