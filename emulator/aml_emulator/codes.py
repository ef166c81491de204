"""Code assets (``command(code=...)`` snapshots): versions, pending uploads, node copies.

What azure-ai-ml 1.35 does for ``command(code="folder")`` (``operations/_code_operations.py``
``CodeOperations.create_or_update``, ``_artifacts/_artifact_utilities.py``
``_check_and_upload_path``/``upload_artifact``, ``_artifacts/_blob_storage_helper.py``
``BlobStorageClient.upload``), and what this module answers:

1. ``GET .../codes/{random name}/versions?hash=<sha256>&hashVersion=202208``: the SDK names
   every anonymous snapshot with a fresh random name, so a snapshot can only be reused if
   the service matches the hash across the whole workspace; it then reads the name and
   version from the returned id and ``GET``s that version.  :meth:`CodeStore.find_by_hash`
   does the same.
2. ``POST .../codes/{name}/versions/1/startPendingUpload`` (``TemporaryBlobReference``):
   a fresh container and a container SAS (read, write, list) on the emulator's blob
   service (:mod:`aml_emulator.blobs`).  The container name imitates AML's
   (``<8 hex>-e-<guid>``, as in the ``codeUri`` of a real response quoted in
   Azure/azure-cli-extensions#6662).
3. Blob uploads with that SAS (``<folder name>/<relative path>`` in the container), then
   ``Set Blob Metadata`` (``upload_status=completed``, name, version) on the first file.
4. ``PUT .../codes/{name}/versions/1`` with ``codeUri`` = ``<blobUri>/<folder name>`` and
   ``properties.hash_sha256``/``hash_version``; the job's ``codeId`` is that version's id.

A node of a job with a ``codeId`` gets its own copy of the snapshot as its working
directory (:func:`materialise`), as each AML node downloads the snapshot itself.

This module imports no third-party package except through :mod:`.blobs` (tornado).
"""

from __future__ import annotations

import os
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from . import identity
from .blobs import BlobStore
from .errors import ApiError

#: Storage account name of the emulated workspace storage (3-24 lower-case alphanumerics).
STORAGE_ACCOUNT = "emulatorwsstorage"
#: Seconds a pending-upload SAS stays valid.
SAS_TTL = 3600.0
#: Metadata key azure-ai-ml puts on a blob that stands for a folder (``hdi_isfolder``).
_HDI_FOLDER = "hdi_isfolder"
_CODE_ID = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/"
    r"Microsoft\.MachineLearningServices/workspaces/(?P<ws>[^/]+)/codes/(?P<name>[^/]+)"
    r"/versions/(?P<version>[^/]+)$",
    re.IGNORECASE,
)


@dataclass
class CodeVersion:
    """A registered code asset version (a snapshot in the blob store)."""

    name: str
    version: str
    code_uri: str
    account: str
    container: str
    prefix: str
    is_anonymous: bool = False
    description: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    properties: dict[str, str] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    modified: float = field(default_factory=time.time)

    @property
    def arm_id(self) -> str:
        """str: ``/subscriptions/.../workspaces/{ws}/codes/{name}/versions/{version}``."""
        return identity.child_id("codes", self.name, "versions", self.version)

    def matches_hash(self, sha256: str, hash_version: str | None) -> bool:
        """Whether the version's content hash is ``sha256`` (of ``hash_version``).

        Parameters
        ----------
        sha256
            ``hash`` query parameter.
        hash_version
            ``hashVersion`` query parameter (None: any).

        Returns
        -------
        bool
            True on a match.
        """
        if self.properties.get("hash_sha256", "").lower() != sha256.lower():
            return False
        return hash_version is None or self.properties.get("hash_version") == str(hash_version)


def code_version_to_rest(cv: CodeVersion) -> dict[str, Any]:
    """Return the ARM ``CodeVersion`` resource.

    Parameters
    ----------
    cv
        The version.

    Returns
    -------
    dict
        The shape of a real answer (Azure/azure-cli-extensions#6662): ``id``, ``name``
        (the version), ``type``, ``properties`` (``codeUri``, ``isAnonymous``,
        ``properties.hash_sha256``...), ``systemData``.
    """
    return {
        "id": cv.arm_id,
        "name": cv.version,
        "type": f"{identity.PROVIDER}/workspaces/codes/versions",
        "properties": {
            "description": cv.description,
            "tags": dict(cv.tags),
            "properties": dict(cv.properties),
            "isArchived": False,
            "isAnonymous": cv.is_anonymous,
            "codeUri": cv.code_uri,
            "provisioningState": "Succeeded",
        },
        "systemData": identity.system_data(cv.created, cv.modified),
    }


def code_container_to_rest(name: str, versions: list[CodeVersion]) -> dict[str, Any]:
    """Return the ARM ``CodeContainer`` resource.

    Parameters
    ----------
    name
        Code asset name.
    versions
        Its versions (at least one).

    Returns
    -------
    dict
        ``id``, ``name``, ``type``, ``properties`` (``latestVersion``, ``nextVersion``), ``systemData``.
    """
    latest = max(versions, key=lambda v: v.created)
    numeric = [int(v.version) for v in versions if v.version.isdigit()]
    return {
        "id": identity.child_id("codes", name),
        "name": name,
        "type": f"{identity.PROVIDER}/workspaces/codes",
        "properties": {
            "description": None,
            "tags": {},
            "properties": {},
            "isArchived": False,
            "latestVersion": latest.version,
            "nextVersion": str(max(numeric) + 1) if numeric else "1",
            "provisioningState": "Succeeded",
        },
        "systemData": identity.system_data(min(v.created for v in versions)),
    }


def _parse_blob_url(uri: str) -> tuple[str, str, str]:
    """Split an emulator blob URL into account, container and prefix (no slashes at the ends)."""
    parts = urlsplit(uri)
    host = parts.hostname or ""
    segments = unquote(parts.path).split("/")
    if (
        parts.scheme not in ("http", "https")
        or not (host.startswith("127.") or host == "localhost")
        or len(segments) < 4
        or segments[1] != "blob"
    ):
        raise ValueError(uri)
    prefix = "/".join(s for s in segments[4:] if s not in ("", "."))
    return segments[2], segments[3], prefix


class CodeStore:
    """Code versions of the workspace and the blob store holding their snapshots.

    Parameters
    ----------
    root
        Directory for blob data.
    """

    def __init__(self, root: str) -> None:
        self.blobs = BlobStore(root)
        self.versions: dict[str, dict[str, CodeVersion]] = {}
        #: pendingUploadId -> container
        self.pending: dict[str, str] = {}

    # -------------------------------------------------------------- versions
    def get(self, name: str, version: str) -> CodeVersion:
        """Return a code version.

        Parameters
        ----------
        name, version
            Code asset name and version.

        Returns
        -------
        CodeVersion
            The version.

        Raises
        ------
        ApiError
            404 ``UserError`` if absent.
        """
        found = self.versions.get(name, {}).get(version)
        if found is None:
            raise ApiError(
                404,
                "UserError",
                f"Code {name}:{version} not found in workspace {identity.WORKSPACE_NAME}",
            )
        return found

    def versions_of(self, name: str) -> list[CodeVersion]:
        """Return the versions of a code asset, newest first.

        Parameters
        ----------
        name
            Code asset name.

        Returns
        -------
        list of CodeVersion
            Its versions.
        """
        return sorted(self.versions.get(name, {}).values(), key=lambda v: v.created, reverse=True)

    def find_by_hash(self, sha256: str, hash_version: str | None) -> list[CodeVersion]:
        """Return every version in the workspace whose snapshot has this content hash.

        Parameters
        ----------
        sha256
            Content hash (``azure.ai.ml._utils._asset_utils.get_content_hash``).
        hash_version
            Hash algorithm version (202208 in azure-ai-ml 1.35).

        Returns
        -------
        list of CodeVersion
            Oldest first (the first one is the snapshot the SDK reuses).
        """
        found = [
            v
            for versions in self.versions.values()
            for v in versions.values()
            if v.matches_hash(sha256, hash_version)
        ]
        return sorted(found, key=lambda v: v.created)

    def put(self, name: str, version: str, properties: dict[str, Any]) -> tuple[CodeVersion, bool]:
        """Create or update a code version from REST ``properties``.

        Parameters
        ----------
        name, version
            Code asset name and version.
        properties
            REST ``properties``: ``codeUri`` (required), ``isAnonymous``,
            ``description``, ``tags``, ``properties``.

        Returns
        -------
        tuple
            ``(version, created)``.

        Raises
        ------
        ApiError
            400 when ``codeUri`` is missing, does not point into the emulator's blob
            service, or names a prefix with no blob; 400 ``Asset paths cannot be
            updated.`` when an existing version gets another ``codeUri`` (the error the
            SDK checks for, ``ASSET_PATH_ERROR`` in ``_artifacts/_constants.py``).
        """
        uri = properties.get("codeUri")
        if not isinstance(uri, str) or not uri:
            raise ApiError(400, "BadRequest", "properties.codeUri is required")
        existing = self.versions.get(name, {}).get(version)
        if existing is not None and existing.code_uri != uri:
            raise ApiError(400, "UserError", "Asset paths cannot be updated.")
        try:
            account, container, prefix = _parse_blob_url(uri)
        except ValueError:
            raise ApiError(
                400,
                "UserError",
                f"codeUri {uri!r} is not a blob URL of this workspace's storage "
                f"(the emulator's blob service, {STORAGE_ACCOUNT})",
            ) from None
        ctr = self.blobs.containers.get((account, container))
        names = [
            n
            for n in (ctr.blobs if ctr is not None else {})
            # a folder snapshot, or a single-file one (the prefix is the blob)
            if not prefix or n == prefix or n.startswith(prefix + "/")
        ]
        if not names:
            raise ApiError(
                400,
                "UserError",
                f"codeUri {uri!r} points to no uploaded blob (container {container!r}, "
                f"prefix {prefix!r}); upload the snapshot before registering the code version",
            )
        tags = properties.get("tags") or {}
        props = properties.get("properties") or {}
        if not isinstance(tags, dict) or not isinstance(props, dict):
            raise ApiError(400, "BadRequest", "tags and properties must be objects")
        if existing is not None:
            existing.description = properties.get("description", existing.description)
            existing.tags = {str(k): str(v) for k, v in tags.items()}
            existing.modified = time.time()
            return existing, False
        cv = CodeVersion(
            name=name,
            version=version,
            code_uri=uri,
            account=account,
            container=container,
            prefix=prefix,
            is_anonymous=bool(properties.get("isAnonymous", False)),
            description=properties.get("description"),
            tags={str(k): str(v) for k, v in tags.items()},
            properties={str(k): str(v) for k, v in props.items()},
        )
        self.versions.setdefault(name, {})[version] = cv
        return cv, True

    def resolve(self, code_id: str) -> CodeVersion:
        """Return the version a job's ``codeId`` names.

        Parameters
        ----------
        code_id
            ARM id ``.../workspaces/{ws}/codes/{name}/versions/{version}``.

        Returns
        -------
        CodeVersion
            The version.

        Raises
        ------
        ApiError
            400 for an id that is not a workspace code version id; 404 ``UserError``
            for a version that does not exist in this workspace (as the emulator
            refuses unknown environments, ``Engine.job_environment``).
        """
        m = _CODE_ID.match(code_id.strip())
        if m is None:
            raise ApiError(
                400,
                "UserError",
                f"codeId {code_id!r} is not the ARM id of a workspace code version "
                "(.../workspaces/<ws>/codes/<name>/versions/<version>)",
            )
        ours = (identity.SUBSCRIPTION_ID, identity.RESOURCE_GROUP, identity.WORKSPACE_NAME)
        if [m["sub"].lower(), m["rg"].lower(), m["ws"].lower()] != [x.lower() for x in ours]:
            raise ApiError(
                404,
                "UserError",
                f"Code {m['name']}:{m['version']} not found: codeId names another workspace "
                f"({m['sub']}/{m['rg']}/{m['ws']})",
            )
        return self.get(m["name"], m["version"])

    # -------------------------------------------------------------- uploads
    def start_pending_upload(self, base_url: str, body: dict[str, Any]) -> dict[str, Any]:
        """Create (or get) a temporary container and return its SAS, as AML does.

        Parameters
        ----------
        base_url
            The emulator's base URL (the blob service is under ``/blob``).
        body
            ``PendingUploadRequestDto``: ``pendingUploadId`` (optional, reused),
            ``pendingUploadType`` (``TemporaryBlobReference``).

        Returns
        -------
        dict
            ``PendingUploadResponseDto``: ``blobReferenceForConsumption`` (``blobUri`` of
            the container, ``credential: {credentialType: SAS, sasUri}``,
            ``storageAccountArmId``), ``pendingUploadId``, ``pendingUploadType``.

        Raises
        ------
        ApiError
            400 for another ``pendingUploadType``.
        """
        kind = body.get("pendingUploadType") or "TemporaryBlobReference"
        if kind != "TemporaryBlobReference":
            raise ApiError(
                400,
                "UserError",
                f"pendingUploadType {kind!r} is not supported; use TemporaryBlobReference",
            )
        upload_id = str(body.get("pendingUploadId") or uuid.uuid4())
        container = self.pending.get(upload_id)
        if container is None:
            container = f"{uuid.uuid4().hex[:8]}-e-{uuid.uuid4()}"
            self.blobs.create_container(STORAGE_ACCOUNT, container)
            self.pending[upload_id] = container
        protocol = "https" if base_url.startswith("https:") else "https,http"
        sas = self.blobs.issue_sas(STORAGE_ACCOUNT, container, "rwl", SAS_TTL, protocol)
        blob_uri = f"{base_url}/blob/{STORAGE_ACCOUNT}/{container}"
        return {
            "blobReferenceForConsumption": {
                "blobUri": blob_uri,
                "storageAccountArmId": (
                    f"/subscriptions/{identity.SUBSCRIPTION_ID}/resourceGroups/"
                    f"{identity.RESOURCE_GROUP}/providers/Microsoft.Storage/storageAccounts/"
                    f"{STORAGE_ACCOUNT}"
                ),
                "credential": {"credentialType": "SAS", "sasUri": f"{blob_uri}?{sas}"},
            },
            "pendingUploadId": upload_id,
            "pendingUploadType": "TemporaryBlobReference",
        }


def materialise(store: CodeStore, code_id: str, dest_dir: str) -> list[str]:
    """Copy a code snapshot's files into a node's working directory.

    The files under the ``codeUri`` prefix land at the top of ``dest_dir`` (a job
    with ``code="src"`` runs ``python script.py`` for ``src/script.py``, as on AML).

    Parameters
    ----------
    store
        The workspace's code store.
    code_id
        The job's ``codeId``.
    dest_dir
        Destination directory (created if needed).

    Returns
    -------
    list of str
        Relative paths written.
    """
    cv = store.resolve(code_id)
    blobs = store.blobs.container(cv.account, cv.container).blobs
    os.makedirs(dest_dir, exist_ok=True)
    root = os.path.realpath(dest_dir)
    if cv.prefix and cv.prefix in blobs:  # a single-file snapshot
        pairs = [(cv.prefix, cv.prefix.rsplit("/", 1)[-1])]
    else:
        start = cv.prefix + "/" if cv.prefix else ""
        pairs = [(n, n[len(start) :]) for n in sorted(blobs) if n.startswith(start)]
    written: list[str] = []
    for name, rel in pairs:
        parts = [p for p in rel.split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            continue  # never write outside the working directory
        target = os.path.realpath(os.path.join(root, *parts))
        if os.path.commonpath([root, target]) != root:
            continue
        if blobs[name].metadata.get(_HDI_FOLDER):
            os.makedirs(target, exist_ok=True)
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        store.blobs.copy_to(cv.account, cv.container, name, target)
        written.append("/".join(parts))
    return written
