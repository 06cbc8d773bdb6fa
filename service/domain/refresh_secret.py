"""The server-wide secret that derives a refresh token's child (`derive_child_token`),
shared by every replica: created by the first, sealed under the KEK."""

from __future__ import annotations

import secrets

from service.clock import Clock, to_datetime
from service.domain.ports import ServerSecretStorage
from service.secrets_box import SecretBox

_REFRESH_SECRET = "refresh-token-derivation"


async def open_refresh_secret(store: ServerSecretStorage, box: SecretBox) -> bytes | None:
    """The stored refresh secret, opened (KeyDecryptionError under a wrong KEK); None if
    there is none yet."""
    sealed = await store.server_secret(_REFRESH_SECRET)
    return None if sealed is None else box.open(sealed, label=_REFRESH_SECRET)


async def load_refresh_secret(store: ServerSecretStorage, box: SecretBox, *, clock: Clock) -> bytes:
    """The refresh secret, created (under the bootstrap lock) if there is none yet."""
    sealed = await store.server_secret(_REFRESH_SECRET)
    if sealed is None:
        async with store.bootstrap_lock():
            sealed = await store.server_secret(_REFRESH_SECRET)
            if sealed is None:
                sealed = box.seal(secrets.token_bytes(32), label=_REFRESH_SECRET)
                await store.insert_server_secret(
                    _REFRESH_SECRET, sealed, now=to_datetime(clock.now())
                )
    return box.open(sealed, label=_REFRESH_SECRET)
