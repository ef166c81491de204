"""SSH client keys and host-key checking for :mod:`dask_amlcompute.connect.tunnel`.

:class:`HostKeyChecker` records which host key a server offered and whether
``known_hosts`` knew the host, so the tunnel can say exactly what went wrong.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncssh

from ..exceptions import ConfigurationError

__all__ = ["HostKeyChecker", "KeyLike", "key_fingerprint", "resolve_client_keys"]

#: A private key: a file path, its text, or a loaded asyncssh key.
KeyLike = str | bytes | os.PathLike | asyncssh.SSHKey | asyncssh.SSHKeyPair


def resolve_client_keys(
    client_keys: KeyLike | Sequence[KeyLike] | None = None,
) -> Sequence[asyncssh.SSHKeyPair] | None:
    """Load the private keys to log in with (``None``: OpenSSH's defaults and the agent).

    Each item is a private key file path (``~`` expanded), the text of an
    unencrypted private key, or a loaded :class:`asyncssh.SSHKey` / ``SSHKeyPair``.

    Raises
    ------
    ConfigurationError
        A file is unreadable, a key cannot be parsed or is encrypted, or the
        sequence is empty.
    """
    if client_keys is None:
        return None
    single = (str, bytes, os.PathLike, asyncssh.SSHKey, asyncssh.SSHKeyPair)
    items = [client_keys] if isinstance(client_keys, single) else list(client_keys)
    if not items:
        raise ConfigurationError("client_keys is empty; pass None to use ~/.ssh keys and ssh-agent")
    paths_or_keys: list[Any] = [
        i.encode() if isinstance(i, str) and "PRIVATE KEY" in i
        else Path(i).expanduser() if isinstance(i, (str, os.PathLike)) else i
        for i in items
    ]  # fmt: skip
    try:
        return asyncssh.load_keypairs(paths_or_keys)
    except OSError as exc:
        raise ConfigurationError(f"Cannot read an SSH key file: {exc}") from exc
    except (asyncssh.KeyImportError, ValueError) as exc:  # never the key text in the message
        raise ConfigurationError(
            f"Cannot load an SSH key: {exc}. Pass an unencrypted key (no passphrase), or "
            "client_keys=None to use the ssh-agent."
        ) from exc


def key_fingerprint(pair: asyncssh.SSHKeyPair) -> str:
    """The OpenSSH ``SHA256:...`` fingerprint of a key pair's key (pairs have no method)."""
    digest = hashlib.sha256(pair.key_public_data).digest()
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
