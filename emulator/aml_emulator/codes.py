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
   a fresh container and a container SAS on the workspace's blob storage, an Azurite
   (:mod:`aml_emulator.azurite`) started on first use.  The container name imitates AML's
   (``<8 hex>-e-<guid>``, as in the ``codeUri`` of a real response quoted in
   Azure/azure-cli-extensions#6662).
3. Blob uploads with that SAS (``<folder name>/<relative path>`` in the container), then
   ``Set Blob Metadata`` (``upload_status=completed``, name, version) on the first file.
4. ``PUT .../codes/{name}/versions/1`` with ``codeUri`` = ``<blobUri>/<folder name>`` and
   ``properties.hash_sha256``/``hash_version``; the job's ``codeId`` is that version's id.

A node of a job with a ``codeId`` gets its own copy of the snapshot as its working
directory (:func:`materialise`), as each AML node downloads the snapshot itself; the
emulator downloads it once, when the version is registered (versions are immutable).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from . import identity
from .azurite import Azurite, AzuriteNotFoundError
from .errors import ApiError

#: Hours a pending-upload SAS stays valid.
SAS_HOURS = 1.0
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
    container: str
    prefix: str
    #: the snapshot's files, downloaded when the version was registered
    local: str
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


class CodeStore:
    """Code versions of the workspace and the blob storage holding their snapshots.

    Parameters
    ----------
    root
        Directory for the downloaded snapshots.
    reaper
        Kills the Azurite process group if the emulator dies (``watch``/``forget``).
    """

    def __init__(self, root: str, reaper: Any = None) -> None:
        self.root = root
        self.reaper = reaper
        self.versions: dict[str, dict[str, CodeVersion]] = {}
        #: pendingUploadId -> container
        self.pending: dict[str, str] = {}
        self._azurite: Azurite | None = None
        self._lock = threading.Lock()

    def storage(self) -> Azurite:
        """Return the workspace's blob storage, starting Azurite on first use.

        Returns
        -------
        Azurite
            The running service.

        Raises
        ------
        ApiError
            503 when Azurite cannot be found or installed (the message says how).
        """
        with self._lock:
            if self._azurite is None:
                try:
                    self._azurite = Azurite().start()
                except (AzuriteNotFoundError, OSError, RuntimeError) as exc:
                    raise ApiError(424, "FailedDependency", f"workspace storage: {exc}") from exc
                if self.reaper is not None and self._azurite.proc is not None:
                    self.reaper.watch(self._azurite.proc.pid)
            return self._azurite

    def close(self) -> None:
        """Stop Azurite (when started)."""
        with self._lock:
            azurite, self._azurite = self._azurite, None
        if azurite is not None:
            if self.reaper is not None and azurite.proc is not None:
                self.reaper.forget(azurite.proc.pid)
            azurite.stop()

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
        endpoint = self._azurite.blob_endpoint if self._azurite is not None else None
        if not endpoint or not uri.startswith(endpoint + "/"):
            raise ApiError(
                400,
                "UserError",
                f"codeUri {uri!r} is not a blob URL of this workspace's storage "
                f"({endpoint or 'nothing uploaded yet'})",
            )
        container, _, prefix = unquote(uri[len(endpoint) + 1 :]).partition("/")
        prefix = "/".join(p for p in prefix.split("/") if p not in ("", "."))
        local = os.path.join(self.root, f"{name}-{version}-{uuid.uuid4().hex[:8]}")
        if existing is None and not self._download(container, prefix, local):
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
            container=container,
            prefix=prefix,
            local=local,
            is_anonymous=bool(properties.get("isAnonymous", False)),
            description=properties.get("description"),
            tags={str(k): str(v) for k, v in tags.items()},
            properties={str(k): str(v) for k, v in props.items()},
        )
        self.versions.setdefault(name, {})[version] = cv
        return cv, True

    def _download(self, container: str, prefix: str, dest: str) -> bool:
        """Download the blobs under ``prefix`` (or the one blob ``prefix``) into ``dest``.

        Returns False when there is none. Folder markers (``hdi_isfolder``) become
        folders; a name that would leave ``dest`` is skipped.
        """
        from azure.core.exceptions import ResourceNotFoundError

        root = os.path.realpath(dest)
        with self.storage().blob_service_client() as service:
            client = service.get_container_client(container)
            try:
                blobs = list(client.list_blobs(name_starts_with=prefix, include=["metadata"]))
            except ResourceNotFoundError:
                return False
            if prefix and any(b.name == prefix for b in blobs):  # a single-file snapshot
                pairs = [(b, prefix.rsplit("/", 1)[-1]) for b in blobs if b.name == prefix]
            else:
                start = prefix + "/" if prefix else ""
                pairs = [(b, b.name[len(start) :]) for b in blobs if b.name.startswith(start)]
            for blob, rel in pairs:
                parts = [p for p in rel.split("/") if p]
                target = os.path.realpath(os.path.join(root, *parts))
                if not parts or ".." in parts or os.path.commonpath([root, target]) != root:
                    continue  # never write outside the snapshot folder
                if (blob.metadata or {}).get(_HDI_FOLDER):
                    os.makedirs(target, exist_ok=True)
                    continue
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target, "wb") as out:
                    client.download_blob(blob.name).readinto(out)
        os.makedirs(root, exist_ok=True)
        return bool(pairs)

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
            The emulator's base URL (unused: the storage is Azurite's).
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
        storage = self.storage()
        upload_id = str(body.get("pendingUploadId") or uuid.uuid4())
        container = self.pending.get(upload_id)
        if container is None:
            container = f"{uuid.uuid4().hex[:8]}-e-{uuid.uuid4()}"
            storage.create_container(container)
            self.pending[upload_id] = container
        sas = storage.container_sas(container, hours=SAS_HOURS)
        blob_uri = f"{storage.blob_endpoint}/{container}"
        return {
            "blobReferenceForConsumption": {
                "blobUri": blob_uri,
                "storageAccountArmId": (
                    f"/subscriptions/{identity.SUBSCRIPTION_ID}/resourceGroups/"
                    f"{identity.RESOURCE_GROUP}/providers/Microsoft.Storage/storageAccounts/"
                    f"{storage.account_name}"
                ),
                "credential": {"credentialType": "SAS", "sasUri": f"{blob_uri}?{sas}"},
            },
            "pendingUploadId": upload_id,
            "pendingUploadType": "TemporaryBlobReference",
        }


def materialise(store: CodeStore, code_id: str, dest_dir: str) -> None:
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
    """
    shutil.copytree(store.resolve(code_id).local, dest_dir, dirs_exist_ok=True)
