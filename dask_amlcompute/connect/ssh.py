"""Open the SSH tunnel to the node that runs a cluster's scheduler.

Finds the rank-0 node with ``compute.list_nodes()`` (``runId`` is the job,
``privateIpAddress`` the published scheduler host), checks that the compute
allows public SSH with an admin user, and opens an
:class:`~dask_amlcompute.connect.tunnel.SSHTunnel` to the node's public endpoint.
"""

from __future__ import annotations

from typing import Any

from ..exceptions import SchedulerUnreachableError


def pick_node(nodes: list[dict[str, Any]], job_name: str, private_ip: str) -> dict[str, Any] | None:
    """The node running ``job_name`` whose private IP is ``private_ip`` (else any of the job's)."""
    mine = [n for n in nodes if n.get("runId") == job_name]
    for node in mine:
        if node.get("privateIpAddress") == private_ip:
            return node
    return mine[0] if len(mine) == 1 else None


def host_key_alias(compute: str, node: dict[str, Any]) -> str:
    """The name a node's host key is recorded under: ``aml-<compute>-<nodeId>``."""
    return f"aml-{compute}-{node.get('nodeId') or node.get('publicIpAddress')}"


async def open_scheduler_tunnel(
    context: Any, job_name: str, private_ip: str, targets: dict[str, tuple[str, int]]
):
    """Open and return a started SSHTunnel forwarding ``targets`` via the scheduler's node."""
    from .tunnel import SSHTunnel

    compute = context.plan.compute
    settings = context.settings
    if compute is None or not compute.ssh_public_access:
        raise SchedulerUnreachableError(
            f"Compute {settings.compute!r} does not allow public SSH access, so the client "
            "cannot tunnel to the scheduler. Create the compute with remote login (SSH) "
            "enabled and an admin user with your public key, or run the client on the "
            "compute's VNet with connect='direct'."
        )
    if not compute.admin_user:
        raise SchedulerUnreachableError(
            f"Compute {settings.compute!r} has no admin user for SSH; recreate it with "
            "ssh_settings (admin_username and your public key)."
        )
    nodes = await context.ops.list_nodes(settings.compute)
    node = pick_node(nodes, job_name, private_ip)
    if node is None:
        raise SchedulerUnreachableError(
            f"No node of compute {settings.compute!r} runs job {job_name} with private IP "
            f"{private_ip}; list_nodes returned {len(nodes)} node(s)."
        )
    if not node.get("publicIpAddress") or not node.get("port"):
        raise SchedulerUnreachableError(
            f"Node {node.get('nodeId')} running the scheduler has no public IP/SSH port. "
            "Create the compute with a public node IP and remote login enabled, or run the "
            "client on the compute's VNet with connect='direct'."
        )
    tunnel = SSHTunnel(
        ssh_host=node["publicIpAddress"],
        ssh_port=int(node["port"]),
        username=compute.admin_user,
        client_keys=[settings.ssh_key] if settings.ssh_key else None,
        known_hosts=settings.known_hosts,
        trust_on_first_use=settings.ssh_trust_on_first_use,
        targets=targets,
        # one known_hosts entry per node, not per ip:port: AML's public endpoint is a shared
        # load-balancer IP with a port per node, and a new VM behind that port has a new key
        host_key_alias=host_key_alias(settings.compute, node),
    )
    await tunnel.start()
    context.log(
        f"SSH tunnel via {compute.admin_user}@{node['publicIpAddress']}:{node['port']} "
        f"to {private_ip}"
    )
    return tunnel
