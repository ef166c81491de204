"""Datastores of the emulated workspace: their configuration and REST shapes.

A datastore here is a name pointing at a real blob endpoint, normally a local
Azurite (see :mod:`aml_emulator.azurite`).  The emulator only
stores and serves the reference (``GET/list`` and ``listSecrets`` as azure-ai-ml
1.35 calls them); the data itself lives in the storage emulator.

This module imports no third-party package.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from . import identity

#: Credential kinds a datastore can hold, and their REST ``credentialsType``.
CREDENTIAL_TYPES = {"account_key": "AccountKey", "sas": "Sas", "none": "None"}
#: Datastore kinds (REST ``datastoreType``) the emulator serves.
DATASTORE_KINDS = ("AzureBlob", "AzureDataLakeGen2")


def _mask(secret: str | None) -> str:
    return "<none>" if not secret else "***"


@dataclass(repr=False)
class DatastoreSpec:
    """One datastore of the emulated workspace.

    Parameters
    ----------
    name
        Datastore name (``azureml://datastores/<name>/...``).
    account
        Storage account name (Azurite's is ``devstoreaccount1``).
    container
        Blob container (the filesystem of an ADLS Gen2 datastore).
    credential
        ``"account_key"``, ``"sas"`` or ``"none"`` (identity-based access).
    endpoint
        The account's blob endpoint URL, e.g. ``http://127.0.0.1:10000/devstoreaccount1``;
        served as the datastore's ``endpoint`` with ``protocol`` its scheme.  A
        bare suffix such as ``core.windows.net`` is served as is (a real account).
    account_key
        The key returned by ``listSecrets`` for ``credential="account_key"``.
    sas_token
        The token returned by ``listSecrets`` for ``credential="sas"``.
    kind
        ``"AzureBlob"`` or ``"AzureDataLakeGen2"``.
    is_default
        Whether this is the workspace's default datastore.
    description
        Free text.

    Notes
    -----
    ``repr()`` never shows the key or token.
    """

    name: str
    account: str
    container: str
    credential: str = "account_key"
    endpoint: str = "core.windows.net"
    account_key: str | None = None
    sas_token: str | None = None
    kind: str = "AzureBlob"
    is_default: bool = False
    description: str = ""
    created: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.credential not in CREDENTIAL_TYPES:
            raise ValueError(
                f"datastore {self.name!r}: credential must be one of "
                f"{sorted(CREDENTIAL_TYPES)}, not {self.credential!r}"
            )
        if self.kind not in DATASTORE_KINDS:
            raise ValueError(f"datastore {self.name!r}: kind must be one of {DATASTORE_KINDS}")
        if self.credential == "account_key" and not self.account_key:
            raise ValueError(f"datastore {self.name!r}: credential='account_key' needs account_key")
        if self.credential == "sas" and not self.sas_token:
            raise ValueError(f"datastore {self.name!r}: credential='sas' needs sas_token")
        if "://" in self.endpoint and not (urlsplit(self.endpoint).hostname or "").startswith(
            "127."
        ):
            raise ValueError(
                f"datastore {self.name!r}: an endpoint URL must be on loopback "
                f"(127.0.0.0/8), got {self.endpoint!r}"
            )

    def __repr__(self) -> str:
        return (
            f"DatastoreSpec(name={self.name!r}, account={self.account!r}, "
            f"container={self.container!r}, credential={self.credential!r}, "
            f"endpoint={self.endpoint!r}, kind={self.kind!r}, "
            f"account_key={_mask(self.account_key)}, sas_token={_mask(self.sas_token)})"
        )


def datastore_to_rest(spec: DatastoreSpec) -> dict[str, Any]:
    """Return the ARM ``Datastore`` resource of a datastore, without secrets.

    Parameters
    ----------
    spec
        The datastore.

    Returns
    -------
    dict
        ``{id, name, type, properties: {datastoreType, accountName, containerName |
        filesystem, endpoint, protocol, credentials: {credentialsType}, isDefault...},
        systemData}`` as api-version 2025-12-01 answers it.
    """
    if "://" in spec.endpoint:
        endpoint, protocol = spec.endpoint.rstrip("/"), urlsplit(spec.endpoint).scheme
    else:
        endpoint, protocol = spec.endpoint, "https"
    props: dict[str, Any] = {
        "datastoreType": spec.kind,
        "accountName": spec.account,
        "endpoint": endpoint,
        "protocol": protocol,
        # GET never carries secrets: the SDK fetches them with listSecrets.
        "credentials": {"credentialsType": CREDENTIAL_TYPES[spec.credential]},
        "isDefault": spec.is_default,
        "description": spec.description or None,
        "tags": {},
        "properties": {},
        "serviceDataAccessAuthIdentity": "None",
        "subscriptionId": identity.SUBSCRIPTION_ID,
        "resourceGroup": identity.RESOURCE_GROUP,
    }
    props["filesystem" if spec.kind == "AzureDataLakeGen2" else "containerName"] = spec.container
    return {
        "id": identity.child_id("datastores", spec.name),
        "name": spec.name,
        "type": f"{identity.PROVIDER}/workspaces/datastores",
        "properties": props,
        "systemData": identity.system_data(spec.created),
    }


def secrets_to_rest(spec: DatastoreSpec) -> dict[str, Any] | None:
    """Return the ``listSecrets`` answer of a datastore.

    Parameters
    ----------
    spec
        The datastore.

    Returns
    -------
    dict or None
        ``{"secretsType": "AccountKey", "key": ...}`` or
        ``{"secretsType": "Sas", "sasToken": ...}``; None for identity-based datastores.
    """
    if spec.credential == "account_key":
        return {"secretsType": "AccountKey", "key": spec.account_key}
    if spec.credential == "sas":
        return {"secretsType": "Sas", "sasToken": spec.sas_token}
    return None
