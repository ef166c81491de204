"""One watch for all of a cluster's AML jobs: a constant number of requests per interval.

Every ``watch_interval`` the main job's supervisor calls :meth:`JobWatch.poll`: **one** job
list, ``GET /jobs?listViewType=ActiveOnly&tag=KEY`` (:func:`~.._protocol.cluster_key_tag`), holds
every job of the cluster not archived, ended ones with their final status (one request per page,
however many worker jobs). A followed job missing from it costs one ``GET /jobs/{name}``; what
the (lagging) list says of the main job one GET confirms (:meth:`~.jobs.MainJob._main_update`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from .._protocol import cluster_key_tag
from .jobwait import PHASE_MESSAGES
from .ops import JobInfo
from .state import ClusterContext

logger = logging.getLogger(__name__)

#: What to do when a followed job ends.
OnJobEnd = Callable[[JobInfo], Awaitable[None]]
#: Sees ``(previous status, info)`` of each snapshot first; returns the one to go on with.
OnUpdate = Callable[[str | None, JobInfo], Awaitable[JobInfo]]


class JobWatch:
    """The jobs a cluster (``context``) follows, and what to do when each of them ends."""

    def __init__(self, context: ClusterContext) -> None:
        self.context = context
        #: AML job name -> (what to do when it ends, what sees each snapshot first)
        self.followed: dict[str, tuple[OnJobEnd, OnUpdate | None]] = {}

    def follow(self, name: str, on_end: OnJobEnd, on_update: OnUpdate | None = None) -> None:
        """Follow job ``name`` until it ends."""
        self.followed[name] = (on_end, on_update)

    async def poll(self) -> None:
        """Look once at every followed job; hand each one that has ended to its handler.

        Updates ``state.jobs``. The main job ends from ``Finalizing`` on, a worker job once
        its status is terminal. No handler runs once the cluster closes (its own cancels).
        Raises what the job list raised (the caller tries again next interval).
        """
        ctx, state = self.context, self.context.state
        if not self.followed:
            return
        listed = await ctx.ops.list_job_infos(cluster_key_tag(ctx.settings.name))
        for name in list(self.followed):
            info = listed.get(name)
            if info is None:  # archived or not listed yet
                try:
                    info = await ctx.ops.get_job(name)
                except Exception as exc:  # the control plane may be briefly unavailable
                    logger.debug("Polling %s failed: %s", name, exc)
                    continue
            previous = ctx.note(info)
            on_update = self.followed.get(name, (None, None))[1]
            if on_update is not None and not state.closing:
                info = await on_update(previous, info)  # a GET may correct the list
            main = name == ctx.main_job
            if info.status == "Queued" and previous != "Queued" and not main:
                ctx.log(f"Worker job {name} is Queued: {PHASE_MESSAGES['Queued']}")
            if not (ctx.main_job_ended() if main else info.terminal):
                continue
            handlers = self.followed.pop(name, None)
            if handlers is None or state.closing:
                continue
            try:
                await handlers[0](info)
            except Exception:
                logger.exception("Handling the end of AML job %s failed", name)
