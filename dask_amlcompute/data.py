"""Read and write AML datastores from the cluster's workers with fsspec/adlfs.

An AML datastore URI names data by datastore, not by storage account::

    azureml://datastores/<name>/paths/<path>
    azureml://subscriptions/<s>/resourcegroups/<rg>/workspaces/<ws>/datastores/<name>/paths/<path>

:func:`resolve` asks the workspace which account, container and credential (account key,
SAS token or service principal, else the compute's managed identity) the datastore uses:
an ``abfs://`` URL and the ``storage_options`` adlfs needs *on the nodes*, so bulk data
never goes through the notebook (docs/data.md). Secrets stay out of reprs, logs, errors.
"""

from __future__ import annotations

import logging
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from .backend.ops import AmlOps, run_blocking
from .backend.sdknotices import redact
from .exceptions import AmlComputeError, ControlPlaneError

logger = logging.getLogger(__name__)

#: Datastore endpoint suffix of the public Azure cloud.
PUBLIC_SUFFIX = "core.windows.net"
#: storage_options keys whose values are secrets.
SECRET_KEYS = frozenset(
    {"account_key", "sas_token", "connection_string", "client_secret", "credential"}
)
_URI = re.compile(
    r"^azureml://(?:subscriptions/(?P<sub>[^/]+)/resourcegroups/(?P<rg>[^/]+)/"
    r"(?:providers/Microsoft\.MachineLearningServices/)?workspaces/(?P<ws>[^/]+)/)?"
    r"datastores/(?P<name>[^/]+)(?:/paths(?:/(?P<path>.*))?)?/?$",
    re.IGNORECASE,
)
_FORMS = (
    "azureml://datastores/<name>/paths/<path> or azureml://subscriptions/<subscription>/"
    "resourcegroups/<resource group>/workspaces/<workspace>/datastores/<name>/paths/<path>"
)


class DatastoreError(AmlComputeError):
    """Base class of the datastore resolution errors."""


class DatastoreURIError(DatastoreError, ValueError):
    """The string is not an AML datastore URI this module understands."""


class DatastoreNotFoundError(DatastoreError, LookupError):
    """The workspace has no datastore of that name."""


class DatastoreCredentialsError(DatastoreError):
    """The datastore holds no credential the nodes can use."""


class StorageOptions(dict):
    """``storage_options`` for fsspec whose ``repr``/``str`` mask secret values.

    A plain ``dict`` otherwise: pass it to ``dd.read_parquet(...,
    storage_options=...)`` or ``fsspec.open`` as usual.
    """

    def __repr__(self) -> str:
        shown = {k: ("***" if k in SECRET_KEYS and v else v) for k, v in self.items()}
        return f"StorageOptions({shown!r})"  # str() too: dict has no __str__ of its own


@dataclass(frozen=True)
class DatastoreURI:
    """A parsed ``azureml://`` datastore URI (workspace coordinates: long form only)."""

    datastore: str
    path: str
    subscription_id: str | None = None
    resource_group: str | None = None
    workspace: str | None = None


def parse_uri(uri: str) -> DatastoreURI:
    """Parse the short or long form of an AML datastore URI (``/paths/...`` optional).

    Raises DatastoreURIError, naming the accepted forms, for anything else.
    """
    if not isinstance(uri, str):
        raise DatastoreURIError(
            f"expected an azureml:// datastore URI string, got {type(uri).__name__}"
        )
    text = uri.strip()
    if text.startswith("azureml:") and not text.startswith("azureml://"):
        raise DatastoreURIError(
            f"{text!r} names a data asset, not a datastore path; use "
            f"ml_client.data.get(name, version).path to get its datastore URI. Expected {_FORMS}."
        )
    match = _URI.match(text)
    if match is None:
        raise DatastoreURIError(f"not an AML datastore URI: {redact(text)!r}. Expected {_FORMS}.")
    groups = match.groupdict()
    return DatastoreURI(
        datastore=groups["name"],
        path=(groups["path"] or "").lstrip("/"),
        subscription_id=groups["sub"],
        resource_group=groups["rg"],
        workspace=groups["ws"],
    )


@dataclass(frozen=True)
class ResolvedURI:
    """An AML datastore URI resolved to an fsspec URL plus adlfs ``storage_options``.

    Unpacks as ``url, storage_options = resolved``.  ``repr`` masks secrets.

    Parameters
    ----------
    url
        ``abfs://`` URL (adlfs).
    storage_options
        Keyword arguments of ``adlfs.AzureBlobFileSystem``.
    uri
        The original ``azureml://`` URI.
    datastore
        Datastore name.
    credential
        ``"account_key"``, ``"sas"``, ``"service_principal"`` or ``"identity"``.
    """

    url: str
    storage_options: StorageOptions  # its repr masks the secrets
    uri: str = ""
    datastore: str = ""
    credential: str = ""

    def __iter__(self) -> Iterator[Any]:
        yield self.url
        yield self.storage_options

    def join(self, *parts: str) -> ResolvedURI:
        """The same location (and credentials) with path segments appended (``..`` allowed)."""
        scheme, _, rest = self.url.partition("://")
        container, _, path = rest.partition("/")
        new_path = posixpath.normpath(posixpath.join("/" + path, *parts)).lstrip("/")
        uri = self.uri and f"{self.uri.split('/paths/', 1)[0].rstrip('/')}/paths/{new_path}"
        return replace(self, url=f"{scheme}://{container}/{new_path}", uri=uri)


def _attr(obj: Any, *names: str) -> Any:
    for name in names:
        value = getattr(obj, name, None)
        if value:
            return value
    return None


def _check_workspace(parsed: DatastoreURI, ml_client: Any) -> None:
    """Refuse a long-form URI naming another workspace than ``ml_client``'s."""
    wanted = (parsed.subscription_id, parsed.resource_group, parsed.workspace)
    have = (ml_client.subscription_id, ml_client.resource_group_name, ml_client.workspace_name)
    pairs = zip(wanted, have, strict=True)
    if parsed.workspace and any(h and str(w).lower() != h.lower() for w, h in pairs):
        raise DatastoreURIError(
            f"the URI names workspace {wanted[2]} (subscription {wanted[0]}, resource group "
            f"{wanted[1]}) but ml_client is connected to workspace {have[2]} (subscription "
            f"{have[0]}, resource group {have[1]}); pass an MLClient for that workspace."
        )


def _get_datastore(ml_client: Any, name: str, with_secrets: bool) -> Any:
    ops = AmlOps(ml_client)
    try:
        store = run_blocking(ops.get_datastore(name, include_secrets=with_secrets))
    except ControlPlaneError:
        raise
    except AmlComputeError as exc:
        if not with_secrets:
            raise DatastoreError(f"could not read datastore {name!r}: {redact(str(exc))}") from None
        raise DatastoreCredentialsError(
            f"could not fetch the secrets of datastore {name!r} ({redact(str(exc)).splitlines()[0]}). "
            "Reading them needs the 'Microsoft.MachineLearningServices/workspaces/datastores/"
            "listSecrets/action' permission; or pass identity=True to use the compute's managed "
            "identity (it needs a 'Storage Blob Data Reader/Contributor' role on the account)."
        ) from None
    if store is None:
        names = run_blocking(ops.list_datastore_names())
        known = ", ".join(names) if names else "(none could be listed)"
        raise DatastoreNotFoundError(
            f"datastore {name!r} does not exist in workspace "
            f"{getattr(ml_client, 'workspace_name', '?')}. Datastores: {known}."
        )
    return store


def _endpoint(store: Any) -> tuple[str | None, str]:
    """Return (custom blob endpoint URL or None, endpoint suffix)."""
    endpoint = (_attr(store, "endpoint") or PUBLIC_SUFFIX).strip()
    if "://" in endpoint:
        return endpoint.rstrip("/"), ""
    return None, endpoint.lstrip(".")


#: SDK credential class: (kind, its secret fields); any other: the compute's identity.
_CREDENTIALS = {
    "AccountKeyConfiguration": ("account_key", ("account_key",)),
    "SasTokenConfiguration": ("sas", ("sas_token",)),
    "ServicePrincipalConfiguration": (
        "service_principal",
        ("tenant_id", "client_id", "client_secret"),
    ),
    "CertificateConfiguration": ("certificate", ()),
}


def _credential_of(store: Any) -> tuple[str, dict[str, Any]]:
    """Classify the datastore's credential: (kind, secret fields)."""
    cred = getattr(store, "credentials", None)
    kind, secret_fields = _CREDENTIALS.get(type(cred).__name__, ("identity", ()))
    return kind, {f: getattr(cred, f, None) for f in secret_fields}


def _options(
    store: Any, kind: str, secrets: dict[str, Any], identity_client_id: str | None
) -> StorageOptions:
    name = store.name
    account = _attr(store, "account_name")
    custom, suffix = _endpoint(store)
    if custom is not None:
        # An emulator or other custom endpoint (e.g. Azurite): connection strings carry the URL.
        if kind == "account_key":
            return StorageOptions(
                connection_string=(
                    f"DefaultEndpointsProtocol={urlsplit(custom).scheme};AccountName={account};"
                    f"AccountKey={secrets['account_key']};BlobEndpoint={custom};"
                )
            )
        if kind == "sas":
            return StorageOptions(
                connection_string=(
                    f"BlobEndpoint={custom};SharedAccessSignature={secrets['sas_token'].lstrip('?')}"
                )
            )
        raise DatastoreCredentialsError(
            f"datastore {name!r} uses {kind.replace('_', ' ')} access, but its endpoint {custom} is a "
            "custom (emulated) blob endpoint where Azure AD identities cannot be used. Attach it "
            "with an account key or a SAS token (credential='account_key' or 'sas')."
        )
    opts: dict[str, Any] = {"account_name": account, **secrets}
    if suffix.lower() != PUBLIC_SUFFIX:
        opts["account_host"] = f"{account}.blob.{suffix}"
    if kind == "sas":
        opts["sas_token"] = secrets["sas_token"].lstrip("?")
    if kind == "identity":
        # adlfs builds DefaultAzureCredential on each node: the compute's managed identity.
        opts["anon"] = False
        if identity_client_id:
            opts["managed_identity_client_id"] = identity_client_id
    return StorageOptions(opts)


def _credential(ml_client: Any, name: str, identity: bool | None) -> tuple[Any, str, dict]:
    """The datastore, and the kind and secrets of the credential the nodes use."""
    store = _get_datastore(ml_client, name, with_secrets=False)
    kind, _ = _credential_of(store)
    if identity is True:
        return store, "identity", {}
    if kind == "identity":
        if identity is False:
            raise DatastoreCredentialsError(
                f"datastore {name!r} holds no credentials (identity-based access) but "
                "identity=False was given."
            )
        return store, kind, {}
    store = _get_datastore(ml_client, name, with_secrets=True)
    kind, secrets = _credential_of(store)
    missing = [k for k, v in secrets.items() if not v]
    if kind == "certificate" or missing:
        what = "certificate" if kind == "certificate" else ", ".join(missing)
        raise DatastoreCredentialsError(
            f"datastore {name!r} ({kind.replace('_', ' ')} credentials) has no "
            f"usable secret for the nodes (missing: {what}). Pass identity=True to use the "
            "compute's managed identity, or update the datastore's credentials."
        )
    return store, kind, secrets


def resolve(
    uri: str, ml_client: Any, *, identity: bool | None = None, identity_client_id: str | None = None
) -> ResolvedURI:
    """Resolve an AML datastore URI to an adlfs URL and ``storage_options`` for the nodes.

    Parameters
    ----------
    uri
        ``azureml://datastores/<name>/paths/<path>`` or
        ``azureml://subscriptions/<s>/resourcegroups/<rg>/workspaces/<ws>/datastores/<name>/paths/<path>``.
    ml_client
        ``azure.ai.ml.MLClient`` of the workspace holding the datastore.
    identity
        None: the datastore's stored key / SAS / service principal if it has one,
        else the compute's managed identity. True: the identity. False: a secret.
    identity_client_id
        Client id of a user-assigned managed identity of the compute.

    Returns
    -------
    ResolvedURI
        ``url`` (``abfs://...``) and ``storage_options``.

    Raises
    ------
    DatastoreURIError
        Malformed URI, or a long form naming another workspace than ``ml_client``'s.
    DatastoreNotFoundError
        Unknown datastore (the message lists the workspace's datastores).
    DatastoreCredentialsError
        No credential the nodes can use (e.g. identity-based access to an
        emulated endpoint, certificate credentials, secrets not readable).

    Examples
    --------
    >>> r = resolve("azureml://datastores/workspaceblobstore/paths/data/", ml_client)  # doctest: +SKIP
    >>> df = dd.read_parquet(r.url, storage_options=r.storage_options)  # doctest: +SKIP
    """
    parsed = parse_uri(uri)
    _check_workspace(parsed, ml_client)
    store, kind, secrets = _credential(ml_client, parsed.datastore, identity)
    options = _options(store, kind, secrets, identity_client_id)
    container = _attr(store, "container_name", "filesystem")
    if not container:
        raise DatastoreError(
            f"datastore {parsed.datastore!r} is a {type(store).__name__}, not a "
            "blob container or ADLS Gen2 filesystem; adlfs cannot read it."
        )
    custom, suffix = _endpoint(store)
    if custom is None and suffix.lower() == PUBLIC_SUFFIX:
        url = f"abfs://{container}@{store.account_name}.dfs.{PUBLIC_SUFFIX}/{parsed.path}"
    else:
        url = f"abfs://{container}/{parsed.path}"
    logger.debug("resolved %s to %s (%s access)", redact(uri), url, kind)
    return ResolvedURI(
        url=url, storage_options=options, uri=uri, datastore=store.name, credential=kind
    )


def storage_options(uri: str, ml_client: Any, **kwargs: Any) -> StorageOptions:
    """Only the ``storage_options`` of :func:`resolve` (same arguments)."""
    return resolve(uri, ml_client, **kwargs).storage_options
