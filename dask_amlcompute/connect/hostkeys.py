"""SSH client keys and host-key checking for :mod:`dask_amlcompute.connect.tunnel`.

:func:`resolve_client_keys` loads the keys to log in with (files, key text or
loaded keys; ``None`` means OpenSSH's defaults and the agent), and
:class:`HostKeyChecker` records which host key a server offered and whether
``known_hosts`` knew the host, so the tunnel can say exactly what went wrong.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import asyncssh

from ..exceptions import ConfigurationError

__all__ = ["HostKeyChecker", "KeyLike", "key_fingerprint", "resolve_client_keys"]

#: A private key: a file path, its text, or a loaded asyncssh key.
KeyLike = str | bytes | os.PathLike | asyncssh.SSHKey | asyncssh.SSHKeyPair


def resolve_client_keys(
    client_keys: KeyLike | Sequence[KeyLike] | None = None, passphrase: str | None = None
) -> list[asyncssh.SSHKey | asyncssh.SSHKeyPair] | None:
    """Load the private keys to log in with.

    Parameters
    ----------
    client_keys
        Each item is a private key file path (``~`` expanded), the text of a
        private key, or a loaded :class:`asyncssh.SSHKey` / ``SSHKeyPair``.
        ``None`` means OpenSSH's defaults: ``~/.ssh/id_ed25519``, ``id_rsa``,
        ... and the keys of the running ``ssh-agent``.
    passphrase
        Passphrase of encrypted keys.

    Returns
    -------
    list or None
        The loaded keys, or ``None`` for the defaults (asyncssh loads them).

    Raises
    ------
    ConfigurationError
        A file is unreadable, a key cannot be parsed or decrypted, or the
        sequence is empty.
    """
    if client_keys is None:
        return None
    single = (str, bytes, os.PathLike, asyncssh.SSHKey, asyncssh.SSHKeyPair)
    items = [client_keys] if isinstance(client_keys, single) else list(client_keys)
    if not items:
        raise ConfigurationError("client_keys is empty; pass None to use ~/.ssh keys and ssh-agent")
    keys: list[asyncssh.SSHKey | asyncssh.SSHKeyPair] = []
    for item in items:
        if isinstance(item, (asyncssh.SSHKey, asyncssh.SSHKeyPair)):
            keys.append(item)
            continue
        source: bytes | str | Path
        if isinstance(item, bytes) or (isinstance(item, str) and "PRIVATE KEY" in item):
            source, what = item, "the given key text"
        else:
            source, what = Path(os.fspath(item)).expanduser(), f"the key file {item}"
        try:
            if isinstance(source, Path):
                keys.append(asyncssh.read_private_key(source, passphrase))
            else:
                keys.append(asyncssh.import_private_key(source, passphrase))
        except OSError as exc:
            raise ConfigurationError(f"Cannot read {what}: {exc}") from exc
        except (asyncssh.KeyImportError, ValueError) as exc:
            raise ConfigurationError(
                f"Cannot load {what}: {exc}. Pass an unencrypted key, its passphrase, "
                "or client_keys=None to use the ssh-agent."
            ) from exc
    return keys


def key_fingerprint(key: asyncssh.SSHKey | asyncssh.SSHKeyPair) -> str:
    """The OpenSSH ``SHA256:...`` fingerprint of a key, or of a key pair's public key."""
    if isinstance(key, asyncssh.SSHKey):
        return key.get_fingerprint()
    digest = hashlib.sha256(key.key_public_data).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


class HostKeyChecker(asyncssh.SSHClient):
    """Per-connection client: asyncssh asks it about keys ``known_hosts`` does not trust."""

    def __init__(self, known: asyncssh.SSHKnownHosts, tofu: bool) -> None:
        self._known, self._tofu = known, tofu
        self.offered: asyncssh.SSHKey | None = None
        self.host_known = self.accepted_new = False

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        self.offered = key
        # addr is empty over the job-service WebSocket (no TCP peer)
        trusted, ca_keys, *_ = self._known.match(host, addr or "", None if port == 22 else port)
        self.host_known = bool(trusted or ca_keys)
        self.accepted_new = self._tofu and not self.host_known
        return self.accepted_new
