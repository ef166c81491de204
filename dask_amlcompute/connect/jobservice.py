"""Reach the scheduler through the main job's own SSH service (no public IP needed).

Every main job declares AML's job SSH service (``SshJobService``, node 0 only)
with the cluster's public key. Once it runs, ``jobs.show_services`` names a
``ProxyEndpoint``; :mod:`.proxy` carries an SSH connection (as :data:`JOB_SSH_USER`)
through it, and an :class:`~dask_amlcompute.connect.tunnel.SSHTunnel` forwards the
scheduler and dashboard ports over it: no node public IP, no SSH setting on the compute.

Host keys: the container is new for every job and reached only through AML's
authenticated proxy (TLS, the owner's token) at an endpoint AML named for this job,
so its first key is trusted for this cluster object and pinned in memory; nothing
is written to ``known_hosts``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from urllib.parse import urlparse

import asyncssh

from ..exceptions import SchedulerUnreachableError, TunnelAuthenticationError

logger = logging.getLogger(__name__)

#: User of AML's job SSH daemon (``az ml job connect-ssh`` logs in as ``azureuser``).
JOB_SSH_USER = "azureuser"
#: AML says the service runs 30-120 s after the job; bound the wait beyond that.
SERVICE_WAIT = 300.0


def cluster_key(ssh_key: str | None) -> asyncssh.SSHKey:
    """The user's ``ssh_key``, else a new key in memory only (``from_name`` needs ``ssh_key=``)."""
    if ssh_key:
        return asyncssh.read_private_key(ssh_key)
    return asyncssh.generate_private_key("ssh-ed25519", comment="dask-amlcompute")


def access_token(context: Any) -> str:
    """A token for AML's job-service proxy from ``credential=``, else the ``MLClient``'s.

    ``MLClient`` has no public accessor for its credential: this reads ``_credential``.
    """
    from .proxy import TOKEN_SCOPE

    credential = context.credential
    if credential is None:
        credential = getattr(context.ops.ml_client, "_credential", None)
        if credential is None:
            raise TunnelAuthenticationError(
                "No credential to open AML's job-service proxy with: pass "
                "AmlComputeCluster(credential=...) (e.g. DefaultAzureCredential())."
            )
    return credential.get_token(TOKEN_SCOPE).token


async def wait_for_endpoint(context: Any, job_name: str, deadline: float) -> str:
    """Wait for rank 0's SSH service to run; return its ``ProxyEndpoint``.

    Raises
    ------
    SchedulerUnreachableError
        The job has no SSH service, it failed, or it did not run before
        ``deadline`` (``time.monotonic()``).
    """
    from ..backend.jobwait import job_error

    ops = context.ops
    delay = 0.2
    last = "not listed yet"
    said = False  # say once that we wait (AML takes 30-120 s)
    while True:
        services = await ops.show_services(job_name, 0)
        ssh = [s for s in services.values() if str(getattr(s, "type", "")).lower() == "ssh"]
        for service in ssh:
            status = str(getattr(service, "status", "") or "")
            endpoint = (getattr(service, "properties", None) or {}).get("ProxyEndpoint")
            if status.lower() == "running" and endpoint:
                return str(endpoint)
            error = getattr(service, "error", None)
            if status.lower() == "failed" or error:
                raise SchedulerUnreachableError(
                    f"The SSH service of AML job {job_name} failed: {error or status}. Its "
                    "image needs openssh-server (AML's base images and curated training "
                    "environments have it)."
                )
            last = status or "no status"
        now = time.monotonic()
        if not said:
            context.log(f"Waiting for the SSH service of AML job {job_name} ({last})")
            said = True
        info = await ops.get_job(job_name)
        if info.terminal:
            raise await job_error(ops, info, f"AML job {job_name} ended {info.status}.")
        if now >= deadline:
            raise SchedulerUnreachableError(
                f"The SSH service of AML job {job_name} did not run in time (last: {last}). "
                "AML starts it 30-120 s after the job; the job's image needs openssh-server."
            )
        await asyncio.sleep(min(delay, max(0.0, deadline - now)))
        delay = min(delay * 1.5, context.settings.poll_interval)


async def open_job_service_tunnel(
    context: Any, job_name: str, targets: dict[str, tuple[str, int]], deadline: float
):
    """Open and return a started SSHTunnel to ``targets`` through the job's SSH service."""
    from .proxy import open_proxy_tunnel, proxy_url
    from .tunnel import SSHTunnel

    key = context.plan.job_ssh_key
    if key is None:
        raise SchedulerUnreachableError(
            f"This cluster object has no key for the SSH service of AML job {job_name} (a "
            "reattached cluster does not know the key its creator generated): pass ssh_key=."
        )
    endpoint = await wait_for_endpoint(
        context, job_name, min(deadline, time.monotonic() + SERVICE_WAIT)
    )
    url = proxy_url(endpoint, 0)

    async def dial():
        token = await asyncio.to_thread(access_token, context)
        return await open_proxy_tunnel(url, token)

    parsed = urlparse(url)
    tunnel = SSHTunnel(
        ssh_host=parsed.hostname or endpoint,
        ssh_port=parsed.port or 443,
        username=JOB_SSH_USER,
        client_keys=[key],
        known_hosts=[],  # see the module docstring: pinned in memory on first use
        trust_on_first_use=True,
        host_key_alias=f"aml-job-{job_name}-0",
        dial=dial,
        targets=targets,
    )
    await tunnel.start()
    context.log(f"Connected through the SSH service of AML job {job_name} ({endpoint})")
    return tunnel
