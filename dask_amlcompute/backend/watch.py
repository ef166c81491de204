"""One watch for all of a cluster's AML jobs: a constant number of requests per interval.

While a cluster runs, its main job polls every ``watch_interval`` (see
:meth:`~dask_amlcompute.backend.jobs.MainJob._watch`) and each poll is
:func:`poll_jobs`: **one** job list, ``GET /jobs?listViewType=ActiveOnly&tag=KEY``,
where ``KEY`` is the tag key only this cluster's jobs carry
(:func:`~dask_amlcompute._protocol.cluster_key_tag`). The list holds every job
of the cluster that is not archived, ended ones included with their final
status, so the request count does not grow with the number of worker jobs (a
list of more than one page costs one request per page).

A watched job missing from the list (archived, or just submitted and not listed
yet) costs one ``GET /jobs/{name}`` in that poll. The list may lag a GET (nothing
documents that it is as fresh): the main job seeming to go back to an earlier status is
confirmed with one GET before anything is concluded (see
:meth:`~dask_amlcompute.backend.jobs.MainJob._main_update`). A job that has ended is handed to the
handler it was registered with in :attr:`ClusterState.watched
<dask_amlcompute.backend.state.ClusterState.watched>` and is no longer watched.
"""

from __future__ import annotations

import logging

from .._protocol import cluster_key_tag
from .jobwait import PHASE_MESSAGES
from .ops import JobInfo
from .state import ClusterContext

logger = logging.getLogger(__name__)


def has_ended(context: ClusterContext, info: JobInfo) -> bool:
    """True once ``info``'s job counts as ended for the cluster.

    The main job ends with its scheduler, from ``Finalizing`` on; a worker job
    once its status is terminal.

    Parameters
    ----------
    context
        The cluster's context.
    info
        The job's latest snapshot (already recorded in ``state.jobs``).
    """
    state = context.state
    return state.main_job_ended() if info.name == state.main_job else info.terminal


async def poll_jobs(context: ClusterContext) -> None:
    """Look once at every watched job; hand each one that has ended to its handler.

    Costs one job list request (per page), plus one ``GET /jobs/{name}`` for each
    watched job the list does not hold. Updates ``state.jobs``. Handlers are not
    called once the cluster closes (its own cancellations are not news).

    Parameters
    ----------
    context
        The cluster's context.

    Raises
    ------
    Exception
        The job list failed (the caller tries again next interval).
    """
    ctx, state = context, context.state
    if not state.watched:
        return
    listed = await ctx.ops.list_job_infos(cluster_key_tag(ctx.settings.name))
    for name in list(state.watched):
        info = listed.get(name)
        if info is None:  # archived or not listed yet
            try:
                info = await ctx.ops.get_job(name)
            except Exception as exc:  # the control plane may be briefly unavailable
                logger.debug("Polling %s failed: %s", name, exc)
                continue
        previous = state.jobs.get(name)
        state.jobs[name] = info.status
        if name == state.main_job and state.on_main_update is not None and not state.closing:
            info = await state.on_main_update(previous, info)  # a GET may correct the list
        if info.status == "Queued" and previous != "Queued" and name != state.main_job:
            ctx.log(f"Worker job {name} is Queued: {PHASE_MESSAGES['Queued']}")
        if not has_ended(ctx, info):
            continue
        handler = state.watched.pop(name, None)
        if handler is None or state.closing:
            continue
        try:
            await handler(info)
        except Exception:
            logger.exception("Handling the end of AML job %s failed", name)
