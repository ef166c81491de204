"""A minimal Azure Blob service, served by the emulator itself under ``/blob/<account>/<container>``.

It exists for the code-snapshot path of azure-ai-ml 1.35
(``azure/ai/ml/_artifacts/_blob_storage_helper.py``, ``BlobStorageClient``): the
SDK receives a container SAS URI from ``startPendingUpload`` and uses
azure-storage-blob 12 against it.  Implemented, with the REST semantics of the
Blob service (https://learn.microsoft.com/rest/api/storageservices/blob-service-rest-api):

* Put Blob (block blobs only), Put Block, Put Block List, Get Blob (with ranges),
  Get Blob Properties (``HEAD``), Get/Set Blob Metadata, Get Container Properties,
  List Blobs (``prefix``, ``delimiter``, ``marker``, ``maxresults``, ``include=metadata``);
* conditional headers ``If-Match`` / ``If-None-Match`` (the SDK sends
  ``If-None-Match: *`` when ``overwrite=False``) and ``Content-MD5`` checks;
* service SAS authorisation only: every request must carry a container SAS the
  emulator signed (``sig`` over the documented string-to-sign with a per-emulator
  key), unexpired, with the needed permission letter and protocol.  Anything else
  is refused with ``403 AuthenticationFailed`` / ``AuthorizationPermissionMismatch``
  / ``AuthorizationProtocolMismatch``, as Azure does.

Errors are Azure Storage XML bodies (``<Error><Code>..</Code><Message>..</Message>``)
with the ``x-ms-error-code`` header (the only carrier for ``HEAD`` answers), and every
response carries ``x-ms-request-id`` and ``x-ms-version``.  Blob data lives on disk
below the emulator's temp dir; names and metadata live in memory.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import os
import re
import secrets
import shutil
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import formatdate
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import escape

import tornado.httputil
import tornado.web

#: ``x-ms-version`` answered when the request names none; also the SAS ``sv`` issued.
SERVICE_VERSION = "2021-12-02"
#: Largest block (4000 MiB) and block count Azure accepts; bigger requests are refused.
MAX_BLOCK_BYTES = 4000 * 1024 * 1024
MAX_BLOCKS = 50000
#: Page size of List Blobs when ``maxresults`` is not given (Azure's default).
LIST_PAGE = 5000
_METADATA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CONTAINER_NAME = re.compile(r"^(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")

#: Permission letter each operation needs (service SAS ``sp``; ``c`` also allows
#: creating a blob that does not exist yet, as documented for Put Blob).
_READ, _WRITE, _LIST = "r", "w", "l"


class BlobError(Exception):
    """An Azure Storage error answered as XML.

    Parameters
    ----------
    status
        HTTP status.
    code
        Storage error code (``BlobNotFound``, ``AuthenticationFailed``...).
    message
        First line of the message (request id and time are appended).
    detail
        Extra elements of the error body, e.g. ``{"AuthenticationErrorDetail": ...}``.
    """

    def __init__(
        self, status: int, code: str, message: str, detail: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail or {}


def _http_date(ts: float) -> str:
    return formatdate(ts, usegmt=True)


def _b64md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode("ascii")


@dataclass
class BlobRecord:
    """A committed block blob: its data file and properties."""

    path: str
    size: int
    etag: str
    created: float
    modified: float
    content_type: str = "application/octet-stream"
    content_md5: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    #: ``(block id, offset, size)`` of the committed blocks (one block for Put Blob).
    blocks: list[tuple[str, int, int]] = field(default_factory=list)


@dataclass
class ContainerRecord:
    """A container and its blobs."""

    account: str
    name: str
    created: float = field(default_factory=time.time)
    etag: str = field(default_factory=lambda: f'"0x{secrets.token_hex(8).upper()}"')
    blobs: dict[str, BlobRecord] = field(default_factory=dict)
    #: uncommitted blocks: blob name -> block id -> data file
    staged: dict[str, dict[str, str]] = field(default_factory=dict)


class BlobStore:
    """Containers and blobs of the emulated storage accounts, kept under ``root``.

    Parameters
    ----------
    root
        Directory for blob data (created; removed with the emulator's temp dir).
    """

    def __init__(self, root: str) -> None:
        self.root = root
        os.makedirs(root, exist_ok=True)
        #: Base64 signing key of the emulated accounts (like a storage account key).
        self.account_key = base64.b64encode(secrets.token_bytes(64)).decode("ascii")
        self.containers: dict[tuple[str, str], ContainerRecord] = {}

    # ----------------------------------------------------------------- containers
    def create_container(self, account: str, name: str) -> ContainerRecord:
        """Create a container (no-op if it exists).

        Parameters
        ----------
        account, name
            Storage account and container name (3-63 lower-case letters, digits, dashes).

        Returns
        -------
        ContainerRecord
            The container.
        """
        if not _CONTAINER_NAME.match(name):
            raise ValueError(f"invalid container name {name!r}")
        return self.containers.setdefault((account, name), ContainerRecord(account, name))

    def container(self, account: str, name: str) -> ContainerRecord:
        """Return a container.

        Parameters
        ----------
        account, name
            Storage account and container.

        Returns
        -------
        ContainerRecord
            The container.

        Raises
        ------
        BlobError
            404 ``ContainerNotFound``.
        """
        found = self.containers.get((account, name))
        if found is None:
            raise BlobError(404, "ContainerNotFound", "The specified container does not exist.")
        return found

    def blob(self, account: str, container: str, name: str) -> BlobRecord:
        """Return a committed blob.

        Parameters
        ----------
        account, container, name
            Where the blob is.

        Returns
        -------
        BlobRecord
            The blob.

        Raises
        ------
        BlobError
            404 ``ContainerNotFound`` / ``BlobNotFound``.
        """
        found = self.container(account, container).blobs.get(name)
        if found is None:
            raise BlobError(404, "BlobNotFound", "The specified blob does not exist.")
        return found

    def list_names(self, account: str, container: str, prefix: str = "") -> list[str]:
        """Return the committed blob names under a prefix, sorted.

        Parameters
        ----------
        account, container
            The container.
        prefix
            Name prefix.

        Returns
        -------
        list of str
            Blob names.
        """
        blobs = self.container(account, container).blobs
        return sorted(n for n in blobs if n.startswith(prefix))

    # ---------------------------------------------------------------------- SAS
    @staticmethod
    def _string_to_sign(account: str, container: str, params: dict[str, str]) -> str:
        # Service SAS string-to-sign for version 2020-12-06 and later
        # (https://learn.microsoft.com/rest/api/storageservices/create-service-sas).
        fields = [
            params.get("sp", ""),
            params.get("st", ""),
            params.get("se", ""),
            f"/blob/{account}/{container}",
            params.get("si", ""),
            params.get("sip", ""),
            params.get("spr", ""),
            params.get("sv", ""),
            params.get("sr", ""),
            params.get("sst", ""),  # signed snapshot time
            params.get("ses", ""),  # signed encryption scope
            params.get("rscc", ""),
            params.get("rscd", ""),
            params.get("rsce", ""),
            params.get("rscl", ""),
            params.get("rsct", ""),
        ]
        return "\n".join(fields)

    def _sign(self, string_to_sign: str) -> str:
        key = base64.b64decode(self.account_key)
        digest = hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).digest()
        return base64.b64encode(digest).decode("ascii")

    def issue_sas(
        self,
        account: str,
        container: str,
        permissions: str = "rwl",
        ttl: float = 3600.0,
        protocol: str = "https,http",
    ) -> str:
        """Sign a container SAS token (the query string, without ``?``).

        Parameters
        ----------
        account, container
            The container the token is for (it must exist).
        permissions
            ``sp`` letters, e.g. ``"rwl"`` (read, write, list).
        ttl
            Seconds until ``se``.
        protocol
            ``spr``: ``"https"`` or ``"https,http"``.

        Returns
        -------
        str
            ``sv=...&sr=c&sp=...&st=...&se=...&spr=...&sig=...`` (URL-encoded).
        """
        self.container(account, container)
        now = time.time()
        fmt = "%Y-%m-%dT%H:%M:%SZ"
        params = {
            "sv": SERVICE_VERSION,
            "sr": "c",
            "sp": permissions,
            "st": datetime.fromtimestamp(now - 300, timezone.utc).strftime(fmt),
            "se": datetime.fromtimestamp(now + ttl, timezone.utc).strftime(fmt),
            "spr": protocol,
        }
        params["sig"] = self._sign(self._string_to_sign(account, container, params))
        return "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())

    def authorize(
        self,
        account: str,
        container: str,
        params: dict[str, str],
        permission: str,
        protocol: str,
        has_authorization_header: bool = False,
    ) -> None:
        """Check a request's SAS for an operation; raise the error Azure answers.

        Parameters
        ----------
        account, container
            Target container.
        params
            The request's query parameters (decoded).
        permission
            Letter the operation needs (``r``, ``w``, ``l``; ``w`` is also met by ``c``
            for the caller to refine).
        protocol
            ``"http"`` or ``"https"``: how the request arrived.
        has_authorization_header
            The request carried an ``Authorization`` header (shared key / bearer),
            which the emulated accounts do not accept.

        Raises
        ------
        BlobError
            403 when the SAS is missing, forged, expired or lacks the permission.
        """
        auth_failed = (
            "Server failed to authenticate the request. Make sure the value of "
            "Authorization header is formed correctly including the signature."
        )
        sig = params.get("sig")
        if not sig:
            why = (
                "Shared key and bearer token authorization are not accepted by the emulated "
                "storage account; use the SAS issued by startPendingUpload."
                if has_authorization_header
                else "No SAS token (sig) in the request; anonymous access is not allowed."
            )
            raise BlobError(
                403, "AuthenticationFailed", auth_failed, {"AuthenticationErrorDetail": why}
            )
        for key in ("sv", "sr", "sp", "se"):
            if not params.get(key):
                raise BlobError(
                    403,
                    "AuthenticationFailed",
                    auth_failed,
                    {"AuthenticationErrorDetail": f"Missing required SAS parameter '{key}'."},
                )
        string_to_sign = self._string_to_sign(account, container, params)
        if params.get("sr") != "c" or not hmac.compare_digest(
            self._sign(string_to_sign).encode(), sig.encode()
        ):
            raise BlobError(
                403,
                "AuthenticationFailed",
                auth_failed,
                {
                    "AuthenticationErrorDetail": "Signature did not match. String to sign used was "
                    + string_to_sign
                },
            )
        now = datetime.now(timezone.utc)
        try:
            expiry = datetime.strptime(params["se"], "%Y-%m-%dT%H:%M:%SZ").replace(
                tzinfo=timezone.utc
            )
            start = (
                datetime.strptime(params["st"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
                if params.get("st")
                else None
            )
        except ValueError:
            raise BlobError(
                403,
                "AuthenticationFailed",
                auth_failed,
                {"AuthenticationErrorDetail": "se/st is not a valid ISO 8601 time."},
            ) from None
        if now > expiry or (start is not None and now < start):
            raise BlobError(
                403,
                "AuthenticationFailed",
                auth_failed,
                {"AuthenticationErrorDetail": "Signature not valid in the specified time frame"},
            )
        allowed_protocols = (params.get("spr") or "https,http").split(",")
        if protocol not in allowed_protocols:
            raise BlobError(
                403,
                "AuthorizationProtocolMismatch",
                "This request is not authorized to perform this operation using this protocol.",
            )
        granted = params.get("sp", "")
        if permission not in granted and not (permission == _WRITE and "c" in granted):
            raise BlobError(
                403,
                "AuthorizationPermissionMismatch",
                "This request is not authorized to perform this operation using this permission.",
            )

    # -------------------------------------------------------------------- writes
    def _new_file(self, data: bytes) -> str:
        path = os.path.join(self.root, uuid.uuid4().hex)
        with open(path, "wb") as fh:
            fh.write(data)
        return path

    def _commit(
        self,
        ctr: ContainerRecord,
        name: str,
        path: str,
        size: int,
        blocks: list[tuple[str, int, int]],
        content_type: str | None,
        content_md5: str | None,
        metadata: dict[str, str],
    ) -> BlobRecord:
        now = time.time()
        old = ctr.blobs.get(name)
        record = BlobRecord(
            path=path,
            size=size,
            etag=f'"0x{secrets.token_hex(8).upper()}"',
            created=old.created if old is not None else now,
            modified=now,
            content_type=content_type or "application/octet-stream",
            content_md5=content_md5,
            metadata=metadata,
            blocks=blocks,
        )
        ctr.blobs[name] = record
        if old is not None and old.path != path:
            with contextlib.suppress(OSError):
                os.unlink(old.path)
        for staged in ctr.staged.pop(name, {}).values():
            with contextlib.suppress(OSError):
                os.unlink(staged)
        return record

    def put_blob(
        self,
        account: str,
        container: str,
        name: str,
        data: bytes,
        content_type: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> BlobRecord:
        """Create or replace a block blob in one request (Put Blob).

        Parameters
        ----------
        account, container, name
            Where the blob goes.
        data
            Its content.
        content_type
            ``x-ms-blob-content-type``.
        metadata
            ``x-ms-meta-*`` values.

        Returns
        -------
        BlobRecord
            The committed blob (Azure stores the MD5 of a Put Blob body).
        """
        ctr = self.container(account, container)
        path = self._new_file(data)
        block = base64.b64encode(b"put-blob").decode()
        return self._commit(
            ctr,
            name,
            path,
            len(data),
            [(block, 0, len(data))],
            content_type,
            _b64md5(data),
            dict(metadata or {}),
        )

    def put_block(
        self, account: str, container: str, name: str, block_id: str, data: bytes
    ) -> None:
        """Stage an uncommitted block (Put Block).

        Parameters
        ----------
        account, container, name
            The blob.
        block_id
            Base64 block id, as sent.
        data
            Block content.
        """
        ctr = self.container(account, container)
        staged = ctr.staged.setdefault(name, {})
        old = staged.get(block_id)
        staged[block_id] = self._new_file(data)
        if old is not None:
            with contextlib.suppress(OSError):
                os.unlink(old)

    def put_block_list(
        self,
        account: str,
        container: str,
        name: str,
        entries: list[tuple[str, str]],
        content_type: str | None = None,
        content_md5: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> BlobRecord:
        """Commit a block list (Put Block List).

        Parameters
        ----------
        account, container, name
            The blob.
        entries
            ``(kind, block id)`` with kind ``Latest``, ``Committed`` or ``Uncommitted``.
        content_type, content_md5
            ``x-ms-blob-content-type`` / ``x-ms-blob-content-md5`` (stored as given).
        metadata
            ``x-ms-meta-*`` values.

        Returns
        -------
        BlobRecord
            The committed blob.

        Raises
        ------
        BlobError
            400 ``InvalidBlockList`` when a listed block does not exist.
        """
        ctr = self.container(account, container)
        staged = ctr.staged.get(name, {})
        old = ctr.blobs.get(name)
        committed = {bid: (off, size) for bid, off, size in (old.blocks if old else [])}
        path = os.path.join(self.root, uuid.uuid4().hex)
        blocks: list[tuple[str, int, int]] = []
        offset = 0
        try:
            with open(path, "wb") as out:
                for kind, bid in entries:
                    use_staged = kind in ("Uncommitted", "Latest") and bid in staged
                    if use_staged:
                        with open(staged[bid], "rb") as src:
                            chunk = src.read()
                    elif kind in ("Committed", "Latest") and bid in committed and old is not None:
                        off, size = committed[bid]
                        with open(old.path, "rb") as src:
                            src.seek(off)
                            chunk = src.read(size)
                    else:
                        raise BlobError(
                            400, "InvalidBlockList", "The specified block list is invalid."
                        )
                    out.write(chunk)
                    blocks.append((bid, offset, len(chunk)))
                    offset += len(chunk)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return self._commit(
            ctr, name, path, offset, blocks, content_type, content_md5, dict(metadata or {})
        )

    def set_metadata(
        self, account: str, container: str, name: str, metadata: dict[str, str]
    ) -> BlobRecord:
        """Replace a blob's metadata (Set Blob Metadata).

        Parameters
        ----------
        account, container, name
            The blob.
        metadata
            New metadata (replaces all of it).

        Returns
        -------
        BlobRecord
            The blob, with a new ETag.
        """
        blob = self.blob(account, container, name)
        blob.metadata = dict(metadata)
        blob.etag = f'"0x{secrets.token_hex(8).upper()}"'
        blob.modified = time.time()
        return blob

    def read(self, account: str, container: str, name: str) -> bytes:
        """Return a committed blob's content.

        Parameters
        ----------
        account, container, name
            The blob.

        Returns
        -------
        bytes
            Its content.
        """
        with open(self.blob(account, container, name).path, "rb") as fh:
            return fh.read()

    def copy_to(self, account: str, container: str, name: str, dest: str) -> None:
        """Copy a committed blob's content into a local file.

        Parameters
        ----------
        account, container, name
            The blob.
        dest
            Destination file path (its directory must exist).
        """
        shutil.copyfile(self.blob(account, container, name).path, dest)


# --------------------------------------------------------------------- HTTP layer
def _xml_error(err: BlobError, request_id: str) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f0Z")
    extra = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in err.detail.items())
    return (
        '<?xml version="1.0" encoding="utf-8"?>'
        f"<Error><Code>{err.code}</Code><Message>{escape(err.message)}\n"
        f"RequestId:{request_id}\nTime:{when}</Message>{extra}</Error>"
    )


class _MetadataCaseHeaders(tornado.httputil.HTTPHeaders):
    """Response headers that send ``x-ms-meta-*`` names as given.

    tornado writes every header name in ``Http-Header-Case``; azure-storage-blob takes
    metadata names verbatim from the response (``deserialize_metadata``), so
    ``upload_status`` would come back as ``Upload_status`` and azure-ai-ml's
    ``UPLOAD_CONFIRMATION`` check (``BlobStorageClient.check_blob_exists``) would miss it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._meta_names: dict[str, str] = {}
        super().__init__(*args, **kwargs)

    def __setitem__(self, name: str, value: str) -> None:
        if name.lower().startswith("x-ms-meta-"):
            self._meta_names[name.lower()] = name
        super().__setitem__(name, value)

    def get_all(self) -> Iterator[tuple[str, str]]:
        """Yield ``(name, value)`` pairs, metadata names as they were set.

        Yields
        ------
        tuple of str
            Header name and value.
        """
        for name, value in super().get_all():
            yield self._meta_names.get(name.lower(), name), value


class _StorageHandler(tornado.web.RequestHandler):
    """Base of the blob routes: SAS check, storage headers, XML errors."""

    store: BlobStore

    def initialize(self, store: BlobStore) -> None:
        """Receive the blob store.

        Parameters
        ----------
        store
            The emulator's blob store.
        """
        self.store = store

    @property
    def request_id(self) -> str:
        """str: This request's ``x-ms-request-id``."""
        if not hasattr(self, "_request_id"):
            self._request_id = str(uuid.uuid4())
        return self._request_id

    def compute_etag(self) -> str | None:
        """Never derive ETags from bodies (blobs carry their own)."""
        return None

    def set_default_headers(self) -> None:
        """Send the headers every Blob service response carries."""
        self._headers = _MetadataCaseHeaders(self._headers)
        self.set_header("Server", "Windows-Azure-Blob/1.0 Microsoft-HTTPAPI/2.0")
        self.set_header("x-ms-request-id", self.request_id)
        self.set_header("x-ms-version", self.request.headers.get("x-ms-version", SERVICE_VERSION))
        client_id = self.request.headers.get("x-ms-client-request-id")
        if client_id:
            self.set_header("x-ms-client-request-id", client_id)
        self.clear_header("Content-Type")

    def check_xsrf_cookie(self) -> None:
        """Storage requests carry no XSRF cookie (tornado's check is off anyway)."""

    def query(self) -> dict[str, str]:
        """Return the query parameters, last value wins.

        Returns
        -------
        dict
            Decoded query parameters.
        """
        return {k: self.decode_argument(v[-1]) for k, v in self.request.query_arguments.items()}

    def authorize(self, account: str, container: str, permission: str) -> None:
        """Check the request's SAS for ``permission`` on the container.

        Parameters
        ----------
        account, container
            Target container.
        permission
            ``r``, ``w`` or ``l``.
        """
        self.store.authorize(
            account,
            container,
            self.query(),
            permission,
            self.request.protocol,
            has_authorization_header="Authorization" in self.request.headers,
        )

    def metadata_headers(self) -> dict[str, str]:
        """Return the request's ``x-ms-meta-*`` headers as metadata.

        Returns
        -------
        dict
            Name (without the prefix, case kept) to value.

        Raises
        ------
        BlobError
            400 ``InvalidMetadata`` for a name that is not a C# identifier.
        """
        meta: dict[str, str] = {}
        for key, value in self.request.headers.get_all():
            if key.lower().startswith("x-ms-meta-"):
                # tornado normalises header names ("X-Ms-Meta-Upload_status") and keeps no
                # raw copy, so names are stored lower-case: exact for the lower-case names
                # azure-ai-ml sets (upload_status, name, version); Azure itself keeps the
                # case as sent and compares names case-insensitively.
                name = key[len("x-ms-meta-") :].lower()
                if not _METADATA_NAME.match(name):
                    raise BlobError(
                        400,
                        "InvalidMetadata",
                        "The metadata specified is invalid. It has characters that are not permitted.",
                    )
                meta[name] = value
        return meta

    def check_md5(self, data: bytes) -> None:
        """Compare ``Content-MD5`` with the body, as the service does.

        Parameters
        ----------
        data
            Request body.

        Raises
        ------
        BlobError
            400 ``Md5Mismatch`` or ``InvalidMd5``.
        """
        sent = self.request.headers.get("Content-MD5")
        if sent is None:
            return
        try:
            valid = len(base64.b64decode(sent, validate=True)) == 16
        except (binascii.Error, ValueError):
            valid = False
        if not valid:
            raise BlobError(
                400,
                "InvalidMd5",
                "The MD5 value specified in the request is invalid. MD5 value must be 128 bits and Base64-encoded.",
            )
        if sent != _b64md5(data):
            raise BlobError(
                400,
                "Md5Mismatch",
                "The MD5 value specified in the request did not match with the MD5 value "
                "calculated by the server.",
            )

    def check_conditions(self, blob: BlobRecord | None) -> None:
        """Apply ``If-Match`` / ``If-None-Match`` against the current blob.

        Parameters
        ----------
        blob
            The blob as it is now, or None.

        Raises
        ------
        BlobError
            409 ``BlobAlreadyExists`` for ``If-None-Match: *`` on an existing blob,
            412 ``ConditionNotMet`` for other failed conditions.
        """
        none_match = self.request.headers.get("If-None-Match")
        match = self.request.headers.get("If-Match")
        if none_match is not None and blob is not None:
            if none_match.strip() == "*":
                raise BlobError(409, "BlobAlreadyExists", "The specified blob already exists.")
            if blob.etag in [t.strip() for t in none_match.split(",")]:
                raise BlobError(
                    412,
                    "ConditionNotMet",
                    "The condition specified using HTTP conditional header(s) is not met.",
                )
        if match is not None and match.strip() != "*":
            if blob is None or blob.etag not in [t.strip() for t in match.split(",")]:
                raise BlobError(
                    412,
                    "ConditionNotMet",
                    "The condition specified using HTTP conditional header(s) is not met.",
                )
        elif match is not None and blob is None:
            raise BlobError(404, "BlobNotFound", "The specified blob does not exist.")

    def send_blob_headers(self, blob: BlobRecord, with_metadata: bool = True) -> None:
        """Set ETag, Last-Modified and, optionally, the metadata headers.

        Parameters
        ----------
        blob
            The blob.
        with_metadata
            Also send ``x-ms-meta-*``.
        """
        self.set_header("ETag", blob.etag)
        self.set_header("Last-Modified", _http_date(blob.modified))
        if with_metadata:
            for key, value in blob.metadata.items():
                self.set_header(f"x-ms-meta-{key}", value)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Answer Azure Storage XML errors (headers only for ``HEAD``).

        Parameters
        ----------
        status_code
            HTTP status.
        **kwargs
            ``exc_info`` from tornado.
        """
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, BlobError):
            err = exc
        elif isinstance(exc, tornado.web.HTTPError) and status_code == 405:
            err = BlobError(
                405, "UnsupportedHttpVerb", "The resource doesn't support specified Http Verb."
            )
        elif isinstance(exc, tornado.web.HTTPError) and status_code < 500:
            err = BlobError(status_code, "InvalidInput", "One of the request inputs is not valid.")
        else:
            err = BlobError(
                500, "InternalError", f"The server encountered an internal error: {exc!r}"
            )
        self.set_status(err.status)
        self.set_header("x-ms-error-code", err.code)
        if self.request.method == "HEAD":
            self.finish()
            return
        self.set_header("Content-Type", "application/xml")
        self.finish(_xml_error(err, self.request_id))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        """Log unexpected exceptions only (a BlobError is an answer)."""
        if isinstance(value, BlobError):
            return
        super().log_exception(typ, value, tb)

    def _unsupported(self, *args: Any, **kwargs: Any) -> None:
        raise BlobError(
            405, "UnsupportedHttpVerb", "The resource doesn't support specified Http Verb."
        )

    # tornado answers 405 for any verb a subclass does not define; make it XML.
    post = patch = options = _unsupported


def _invalid_query(name: str) -> BlobError:
    return BlobError(
        400,
        "InvalidQueryParameterValue",
        "Value for one of the query parameters specified in the request URI is invalid.",
        {"QueryParameterName": name},
    )


class BlobContainerHandler(_StorageHandler):
    """``/blob/{account}/{container}?restype=container[&comp=list]``."""

    def get(self, account: str, container: str) -> None:
        """List Blobs (``comp=list``) or Get Container Properties.

        Parameters
        ----------
        account, container
            The container.
        """
        q = self.query()
        if q.get("restype") != "container":
            raise _invalid_query("restype")
        if q.get("comp") == "list":
            self.authorize(account, container, _LIST)
            self._list(account, container, q)
            return
        if q.get("comp"):
            raise _invalid_query("comp")
        self.head(account, container)

    def head(self, account: str, container: str) -> None:
        """Get Container Properties.

        Parameters
        ----------
        account, container
            The container.
        """
        if self.query().get("restype") != "container":
            raise _invalid_query("restype")
        self.authorize(account, container, _READ)
        ctr = self.store.container(account, container)
        self.set_header("ETag", ctr.etag)
        self.set_header("Last-Modified", _http_date(ctr.created))
        self.set_header("x-ms-lease-status", "unlocked")
        self.set_header("x-ms-lease-state", "available")
        self.set_header("x-ms-has-immutability-policy", "false")
        self.set_header("x-ms-has-legal-hold", "false")
        self.finish()

    def _list(self, account: str, container: str, q: dict[str, str]) -> None:
        ctr = self.store.container(account, container)
        prefix = q.get("prefix", "")
        delimiter = q.get("delimiter", "")
        marker = q.get("marker", "")
        try:
            page = int(q.get("maxresults", LIST_PAGE))
        except ValueError:
            raise _invalid_query("maxresults") from None
        if not 1 <= page <= LIST_PAGE:
            raise _invalid_query("maxresults")
        includes = {s.strip().lower() for s in q.get("include", "").split(",") if s.strip()}
        items: list[tuple[str, BlobRecord | None]] = []  # (name, blob) or (prefix, None)
        seen: set[str] = set()
        for name in sorted(ctr.blobs):
            if not name.startswith(prefix):
                continue
            if delimiter:
                rest = name[len(prefix) :]
                cut = rest.find(delimiter)
                if cut >= 0:
                    sub = prefix + rest[: cut + len(delimiter)]
                    if sub not in seen:
                        seen.add(sub)
                        items.append((sub, None))
                    continue
            items.append((name, ctr.blobs[name]))
        items = [it for it in items if it[0] > marker] if marker else items
        shown, more = items[:page], items[page:]
        endpoint = f"{self.request.protocol}://{self.request.host}/blob/{account}/"
        parts = [
            '<?xml version="1.0" encoding="utf-8"?>',
            f'<EnumerationResults ServiceEndpoint="{escape(endpoint)}" '
            f'ContainerName="{escape(container)}">',
        ]
        if prefix:
            parts.append(f"<Prefix>{escape(prefix)}</Prefix>")
        if marker:
            parts.append(f"<Marker>{escape(marker)}</Marker>")
        if "maxresults" in q:
            parts.append(f"<MaxResults>{page}</MaxResults>")
        if delimiter:
            parts.append(f"<Delimiter>{escape(delimiter)}</Delimiter>")
        parts.append("<Blobs>")
        for name, blob in shown:
            if blob is None:
                parts.append(f"<BlobPrefix><Name>{escape(name)}</Name></BlobPrefix>")
                continue
            props = [
                f"<Creation-Time>{_http_date(blob.created)}</Creation-Time>",
                f"<Last-Modified>{_http_date(blob.modified)}</Last-Modified>",
                f"<Etag>{escape(blob.etag)}</Etag>",
                f"<Content-Length>{blob.size}</Content-Length>",
                f"<Content-Type>{escape(blob.content_type)}</Content-Type>",
                f"<Content-MD5>{blob.content_md5 or ''}</Content-MD5>",
                "<BlobType>BlockBlob</BlobType>",
                "<AccessTier>Hot</AccessTier><AccessTierInferred>true</AccessTierInferred>",
                "<LeaseStatus>unlocked</LeaseStatus><LeaseState>available</LeaseState>",
                "<ServerEncrypted>true</ServerEncrypted>",
            ]
            meta = ""
            if "metadata" in includes:
                meta = (
                    "<Metadata>"
                    + "".join(f"<{k}>{escape(v)}</{k}>" for k, v in blob.metadata.items())
                    + "</Metadata>"
                )
            parts.append(
                f"<Blob><Name>{escape(name)}</Name><Properties>{''.join(props)}</Properties>"
                f"{meta}</Blob>"
            )
        parts.append("</Blobs>")
        parts.append(f"<NextMarker>{escape(shown[-1][0]) if more else ''}</NextMarker>")
        parts.append("</EnumerationResults>")
        self.set_header("Content-Type", "application/xml")
        self.finish("".join(parts))


class BlobHandler(_StorageHandler):
    """``/blob/{account}/{container}/{blob}``: block blob operations."""

    def put(self, account: str, container: str, blob: str) -> None:
        """Put Blob, Put Block, Put Block List or Set Blob Metadata (by ``comp``).

        Parameters
        ----------
        account, container
            The container.
        blob
            Blob name (URL-decoded).
        """
        q = self.query()
        comp = q.get("comp")
        self.authorize(account, container, _WRITE)
        ctr = self.store.container(account, container)
        current = ctr.blobs.get(blob)
        headers = self.request.headers
        if comp is None:
            if headers.get("x-ms-blob-type", "") != "BlockBlob":
                raise BlobError(
                    400,
                    "InvalidHeaderValue",
                    "The value for one of the HTTP headers is not in the correct format.",
                    {
                        "HeaderName": "x-ms-blob-type",
                        "HeaderValue": headers.get("x-ms-blob-type", ""),
                    },
                )
            self._needs_create(current)
            self.check_conditions(current)
            data = self.request.body
            self.check_md5(data)
            record = self.store.put_blob(
                account,
                container,
                blob,
                data,
                # Put Blob stores x-ms-blob-content-type, else the request's Content-Type.
                headers.get("x-ms-blob-content-type") or headers.get("Content-Type"),
                self.metadata_headers(),
            )
            self.send_blob_headers(record, with_metadata=False)
            self.set_header("Content-MD5", record.content_md5 or "")
            self.set_header("x-ms-request-server-encrypted", "true")
            self.set_status(201)
            self.finish()
        elif comp == "block":
            block_id = q.get("blockid", "")
            try:
                raw = base64.b64decode(block_id, validate=True)
            except (binascii.Error, ValueError):
                raw = b""
            if not raw or len(raw) > 64:
                raise _invalid_query("blockid")
            data = self.request.body
            if len(data) > MAX_BLOCK_BYTES:
                raise BlobError(
                    413,
                    "RequestBodyTooLarge",
                    "The request body is too large and exceeds the maximum permissible limit.",
                )
            self.check_md5(data)
            if len(ctr.staged.get(blob, {})) >= 100000:
                raise BlobError(
                    409,
                    "BlockCountExceedsLimit",
                    "The uncommitted block count cannot exceed the maximum limit of 100,000 blocks.",
                )
            self.store.put_block(account, container, blob, block_id, data)
            if headers.get("Content-MD5"):
                self.set_header("Content-MD5", headers["Content-MD5"])
            self.set_header("x-ms-request-server-encrypted", "true")
            self.set_status(201)
            self.finish()
        elif comp == "blocklist":
            self._needs_create(current)
            self.check_conditions(current)
            try:
                root = ET.fromstring(self.request.body or b"<BlockList/>")
            except ET.ParseError:
                raise BlobError(
                    400, "InvalidXmlDocument", "XML specified is not syntactically valid."
                ) from None
            if root.tag != "BlockList":
                raise BlobError(
                    400, "InvalidXmlDocument", "XML specified is not syntactically valid."
                )
            entries = [(el.tag, (el.text or "").strip()) for el in root]
            if any(k not in ("Latest", "Committed", "Uncommitted") for k, _ in entries):
                raise BlobError(
                    400,
                    "InvalidXmlNodeValue",
                    "The value for one of the XML nodes is not in the correct format.",
                )
            if len(entries) > MAX_BLOCKS:
                raise BlobError(400, "InvalidBlockList", "The specified block list is invalid.")
            self.check_md5(self.request.body)
            record = self.store.put_block_list(
                account,
                container,
                blob,
                entries,
                headers.get("x-ms-blob-content-type"),
                headers.get("x-ms-blob-content-md5"),
                self.metadata_headers(),
            )
            self.send_blob_headers(record, with_metadata=False)
            self.set_header("x-ms-request-server-encrypted", "true")
            self.set_status(201)
            self.finish()
        elif comp == "metadata":
            if current is None:
                raise BlobError(404, "BlobNotFound", "The specified blob does not exist.")
            self.check_conditions(current)
            record = self.store.set_metadata(account, container, blob, self.metadata_headers())
            self.send_blob_headers(record, with_metadata=False)
            self.set_header("x-ms-request-server-encrypted", "true")
            self.set_status(200)
            self.finish()
        else:
            raise _invalid_query("comp")

    def _needs_create(self, current: BlobRecord | None) -> None:
        # "c" (create) allows writing a new blob but not overwriting one.
        granted = self.query().get("sp", "")
        if current is not None and "w" not in granted:
            raise BlobError(
                403,
                "AuthorizationPermissionMismatch",
                "This request is not authorized to perform this operation using this permission.",
            )

    def head(self, account: str, container: str, blob: str) -> None:
        """Get Blob Properties (or Get Blob Metadata with ``comp=metadata``).

        Parameters
        ----------
        account, container
            The container.
        blob
            Blob name.
        """
        q = self.query()
        if q.get("comp") not in (None, "metadata"):
            raise _invalid_query("comp")
        self.authorize(account, container, _READ)
        record = self.store.blob(account, container, blob)
        self.check_conditions(record)
        self.send_blob_headers(record)
        if q.get("comp") is None:
            self._property_headers(record)
            self.set_header("Content-Length", str(record.size))
        self.finish()

    def _property_headers(self, record: BlobRecord) -> None:
        self.set_header("Content-Type", record.content_type)
        if record.content_md5:
            self.set_header("Content-MD5", record.content_md5)
        self.set_header("x-ms-creation-time", _http_date(record.created))
        self.set_header("x-ms-blob-type", "BlockBlob")
        self.set_header("x-ms-lease-status", "unlocked")
        self.set_header("x-ms-lease-state", "available")
        self.set_header("x-ms-server-encrypted", "true")
        self.set_header("x-ms-access-tier", "Hot")
        self.set_header("x-ms-access-tier-inferred", "true")
        self.set_header("Accept-Ranges", "bytes")

    def get(self, account: str, container: str, blob: str) -> None:
        """Get Blob (``Range`` / ``x-ms-range`` give 206) or Get Blob Metadata.

        Parameters
        ----------
        account, container
            The container.
        blob
            Blob name.
        """
        q = self.query()
        if q.get("comp") == "metadata":
            self.head(account, container, blob)
            return
        if q.get("comp") is not None:
            raise _invalid_query("comp")
        self.authorize(account, container, _READ)
        record = self.store.blob(account, container, blob)
        self.check_conditions(record)
        self.send_blob_headers(record)
        self._property_headers(record)
        spec = self.request.headers.get("x-ms-range") or self.request.headers.get("Range")
        start, end = 0, record.size - 1
        if spec:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", spec.strip())
            if not m:
                raise BlobError(
                    400,
                    "InvalidRange",
                    "The range specified is invalid for the current size of the resource.",
                )
            start = int(m.group(1))
            end = min(int(m.group(2)) if m.group(2) else record.size - 1, record.size - 1)
            if start >= record.size:
                self.set_header("Content-Range", f"bytes */{record.size}")
                raise BlobError(
                    416,
                    "InvalidRange",
                    "The range specified is invalid for the current size of the resource.",
                )
            self.set_status(206)
            self.set_header("Content-Range", f"bytes {start}-{end}/{record.size}")
            if record.content_md5:
                # Content-MD5 describes a range only when asked (x-ms-range-get-content-md5).
                self.clear_header("Content-MD5")
                self.set_header("x-ms-blob-content-md5", record.content_md5)
        with open(record.path, "rb") as fh:
            fh.seek(start)
            data = fh.read(max(0, end - start + 1))
        self.set_header("Content-Length", str(len(data)))
        self.finish(data)

    def delete(self, account: str, container: str, blob: str) -> None:
        """Refuse Delete Blob: the SAS the emulator issues has no ``d`` permission.

        Parameters
        ----------
        account, container
            The container.
        blob
            Blob name.
        """
        self.authorize(account, container, "d")
        raise BlobError(
            403,
            "AuthorizationPermissionMismatch",
            "This request is not authorized to perform this operation using this permission.",
        )


def blob_routes(store: BlobStore) -> list[tuple[str, type, dict[str, Any]]]:
    """Return the tornado routes of the blob service.

    Parameters
    ----------
    store
        The emulator's blob store.

    Returns
    -------
    list
        ``(pattern, handler, kwargs)`` tuples; blob names keep their case.
    """
    kw = {"store": store}
    return [
        (r"/blob/(?P<account>[a-z0-9]+)/(?P<container>[^/]+)/?", BlobContainerHandler, kw),
        (r"/blob/(?P<account>[a-z0-9]+)/(?P<container>[^/]+)/(?P<blob>.+)", BlobHandler, kw),
    ]
