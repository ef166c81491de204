"""The workspace's datastores, read with the (synchronous) azure-ai-ml SDK.

:mod:`dask_amlcompute.data` turns a datastore into what adlfs needs on the
nodes; these functions are its only contact with Azure. They block: call them
from a worker thread, never on an event loop thread.
"""

from __future__ import annotations

from typing import Any


class DatastoreRequestError(Exception):
    """AML refused a datastore request (an HTTP error other than 404); the message is AML's."""


def get_datastore(ml_client: Any, name: str, *, include_secrets: bool = False) -> Any | None:
    """The datastore ``name`` of the workspace, or None when there is none of that name.

    Parameters
    ----------
    ml_client
        An ``azure.ai.ml.MLClient`` bound to the workspace.
    name
        Datastore name.
    include_secrets
        Fetch its account key, SAS token or service principal secret too
        (``listSecrets``, a separate permission).

    Returns
    -------
    azure.ai.ml.entities.Datastore or None
        The datastore entity.

    Raises
    ------
    DatastoreRequestError
        AML refused the request (no permission, service error).
    """
    from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

    try:
        return ml_client.datastores.get(name, include_secrets=include_secrets)
    except ResourceNotFoundError:
        return None
    except HttpResponseError as exc:
        raise DatastoreRequestError(str(exc)) from None


def datastore_names(ml_client: Any) -> list[str]:
    """Sorted names of the workspace's datastores; empty when they cannot be listed."""
    from azure.core.exceptions import HttpResponseError

    try:
        return sorted(d.name for d in ml_client.datastores.list())
    except HttpResponseError:
        return []
