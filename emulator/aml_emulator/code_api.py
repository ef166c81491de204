"""HTTP routes of code assets, as azure-ai-ml 1.35 calls them (api-version 2023-04-01).

``GET .../codes``, ``GET .../codes/{name}``, ``GET .../codes/{name}/versions``
(``hash``, ``hashVersion``, ``$orderBy``, ``$top``, ``$skip``),
``GET/PUT .../codes/{name}/versions/{version}`` and
``POST .../codes/{name}/versions/{version}/startPendingUpload``.  The state and the
request flow are described in :mod:`aml_emulator.codes`; the blob
uploads in between go to the workspace storage (Azurite), which the two handlers that
reach it call in a worker thread (starting it, listing and downloading blobs).
"""

from __future__ import annotations

import asyncio
from typing import Any

from .codes import CodeStore, code_container_to_rest, code_version_to_rest
from .errors import ApiError
from .handlers import BaseHandler


class _CodeHandler(BaseHandler):
    @property
    def codes(self) -> CodeStore:
        """CodeStore: the workspace's code assets."""
        return self.engine.codes

    def body_properties(self) -> dict[str, Any]:
        """Return the ``properties`` object of the JSON body.

        Returns
        -------
        dict
            The properties ({} when absent).

        Raises
        ------
        ApiError
            400 for a body that is not an object with an object ``properties``.
        """
        body = self.json_body()
        if not isinstance(body, dict) or not isinstance(body.get("properties", {}), dict):
            raise ApiError(400, "BadRequest", "body must be an object with 'properties'")
        return body.get("properties") or {}


class CodesHandler(_CodeHandler):
    """``GET /codes``."""

    def get(self, **_: str) -> None:
        """List code containers, by name."""
        self.send_json(
            {
                "value": [
                    code_container_to_rest(name, list(versions.values()))
                    for name, versions in sorted(self.codes.versions.items())
                    if versions
                ],
                "nextLink": None,
            }
        )


class CodeContainerHandler(_CodeHandler):
    """``GET /codes/{name}``."""

    def get(self, name: str, **_: str) -> None:
        """Return a code container.

        Parameters
        ----------
        name
            Code asset name.
        """
        versions = self.codes.versions_of(name)
        if not versions:
            raise ApiError(404, "UserError", f"Code {name} not found in workspace")
        self.send_json(code_container_to_rest(name, versions))


class CodeVersionsHandler(_CodeHandler):
    """``GET /codes/{name}/versions``: by name, or workspace-wide by content hash."""

    def get(self, name: str, **_: str) -> None:
        """List versions (``hash``/``hashVersion`` search every code asset).

        Parameters
        ----------
        name
            Code asset name (ignored when ``hash`` is given: the SDK sends a fresh
            random name for every anonymous snapshot and expects the service to find
            an equal snapshot under any name, ``CodeOperations.create_or_update``).
        """
        sha = self.get_argument("hash", None)
        if sha:
            versions = self.codes.find_by_hash(sha, self.get_argument("hashVersion", None))
        else:
            versions = self.codes.versions_of(name)
            if "asc" in self.get_argument("$orderBy", "").lower():
                versions.reverse()
        try:
            skip = int(self.get_argument("$skip", "0") or 0)
            top = self.get_argument("$top", None)
            versions = versions[skip:] if top is None else versions[skip : skip + max(0, int(top))]
        except ValueError:
            raise ApiError(400, "BadRequest", "$top and $skip must be integers") from None
        self.send_json({"value": [code_version_to_rest(v) for v in versions], "nextLink": None})


class CodeVersionHandler(_CodeHandler):
    """``GET/PUT /codes/{name}/versions/{version}``."""

    def get(self, name: str, version: str, **_: str) -> None:
        """Return a code version.

        Parameters
        ----------
        name, version
            Code asset name and version.
        """
        self.send_json(code_version_to_rest(self.codes.get(name, version)))

    async def put(self, name: str, version: str, **_: str) -> None:
        """Register a code version whose ``codeUri`` points at uploaded blobs.

        Parameters
        ----------
        name, version
            Code asset name and version.
        """
        properties = self.body_properties()
        cv, created = await asyncio.to_thread(self.codes.put, name, version, properties)
        self.send_json(code_version_to_rest(cv), 201 if created else 200)


class CodeStartPendingUploadHandler(_CodeHandler):
    """``POST /codes/{name}/versions/{version}/startPendingUpload``."""

    async def post(self, name: str, version: str, **_: str) -> None:
        """Hand out a temporary container and its SAS URI.

        Parameters
        ----------
        name, version
            Code asset name and version the upload is for.
        """
        body = self.json_body()
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "body must be a JSON object")
        self.send_json(
            await asyncio.to_thread(self.codes.start_pending_upload, self.ctx.base_url, body)
        )


def code_routes(ctx: Any, ws_pattern: str) -> list[tuple[str, type, dict[str, Any]]]:
    """Return the tornado routes of the code asset API.

    Parameters
    ----------
    ctx
        Shared handler context (a ``ServerContext``; ``ctx.engine.codes`` is the store).
    ws_pattern
        Regex of the workspace path prefix.

    Returns
    -------
    list
        ``(pattern, handler, kwargs)`` tuples.
    """
    kw = {"ctx": ctx}
    base = "(?i)" + ws_pattern + r"/codes"
    version = base + r"/(?P<name>[^/]+)/versions/(?P<version>[^/]+)"
    return [
        (base, CodesHandler, kw),
        (version + r"/startPendingUpload", CodeStartPendingUploadHandler, kw),
        (version, CodeVersionHandler, kw),
        (base + r"/(?P<name>[^/]+)/versions", CodeVersionsHandler, kw),
        (base + r"/(?P<name>[^/]+)", CodeContainerHandler, kw),
    ]
