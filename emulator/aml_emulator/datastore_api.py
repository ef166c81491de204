"""HTTP routes of the emulated datastores: ``GET/list`` and ``listSecrets``.

Paths are those of azure-ai-ml 1.35 (``arm_ml_service``, api-version 2025-12-01):
``GET .../datastores`` (``isDefault``, ``names``, ``count``, ``$skip``),
``GET .../datastores/{name}`` and ``POST .../datastores/{name}/listSecrets``.
Creating or deleting datastores is not emulated (configure them on the emulator).
"""

from __future__ import annotations

from typing import Any

from .datastores import DatastoreSpec, datastore_to_rest, secrets_to_rest
from .errors import ApiError
from .handlers import BaseHandler


class _DatastoreHandler(BaseHandler):
    def lookup(self, name: str) -> DatastoreSpec:
        spec = self.ctx.datastores.get(name.lower())
        if spec is None:
            raise ApiError(
                404,
                "UserError",
                f"DatastoreNotFound: {name} does not exist in workspace "
                f"{self.path_kwargs.get('ws', '')}",
            )
        return spec


class DatastoresHandler(_DatastoreHandler):
    """``GET /datastores``."""

    def get(self, **_: str) -> None:
        """List datastores (filters: ``isDefault``, ``names``; paging: ``count``, ``$skip``)."""
        specs = sorted(self.ctx.datastores.values(), key=lambda d: d.name.lower())
        if self.get_argument("isDefault", "").lower() == "true":
            specs = [d for d in specs if d.is_default]
        names = self.get_argument("names", "")
        if names:
            wanted = {n.strip().lower() for n in names.split(",")}
            specs = [d for d in specs if d.name.lower() in wanted]
        try:
            skip = int(self.get_argument("$skip", "0") or 0)
            count = int(self.get_argument("count", "30") or 30)
        except ValueError:
            raise ApiError(400, "BadRequest", "count and $skip must be integers") from None
        page = specs[skip : skip + count]
        next_link = None
        if skip + count < len(specs):
            next_link = (
                f"{self.request.protocol}://{self.request.host}{self.request.path}"
                f"?count={count}&$skip={skip + count}"
            )
        self.send_json({"value": [datastore_to_rest(d) for d in page], "nextLink": next_link})


class DatastoreHandler(_DatastoreHandler):
    """``GET /datastores/{name}``."""

    def get(self, name: str, **_: str) -> None:
        """Return a datastore (never its secrets).

        Parameters
        ----------
        name
            Datastore name.
        """
        self.send_json(datastore_to_rest(self.lookup(name)))


class DatastoreSecretsHandler(_DatastoreHandler):
    """``POST /datastores/{name}/listSecrets``."""

    def post(self, name: str, **_: str) -> None:
        """Return the datastore's key or SAS token.

        Parameters
        ----------
        name
            Datastore name.
        """
        spec = self.lookup(name)
        self.json_body()  # validates the body ({expirableSecret, expireAfterHours})
        secrets = secrets_to_rest(spec)
        if secrets is None:
            raise ApiError(
                400,
                "UserError",
                f"Datastore {spec.name} uses identity-based access and holds no secrets",
            )
        self.send_json(secrets)


def datastore_routes(ctx: Any, ws_pattern: str) -> list[tuple[str, type, dict[str, Any]]]:
    """Return the tornado routes of the datastore API.

    Parameters
    ----------
    ctx
        Shared handler context, a ``ServerContext`` (``ctx.datastores`` maps
        lower-case names to specs).
    ws_pattern
        Regex of the workspace path prefix.

    Returns
    -------
    list
        ``(pattern, handler, kwargs)`` tuples.
    """
    kw = {"ctx": ctx}
    base = "(?i)" + ws_pattern + r"/datastores"
    return [
        (base, DatastoresHandler, kw),
        (base + r"/(?P<name>[^/]+)/listSecrets", DatastoreSecretsHandler, kw),
        (base + r"/(?P<name>[^/]+)", DatastoreHandler, kw),
    ]
