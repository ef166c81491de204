"""Open the SSH tunnel to the node that runs a cluster's scheduler.

Finds the rank-0 node with ``compute.list_nodes()`` (``runId`` is the job,
``privateIpAddress`` the published scheduler host) and opens an
:class:`~dask_amlcompute.connect.tunnel.SSHTunnel` to its public endpoint. The
plan refused this path already where the compute has no public SSH access, node
public IPs or admin user (:func:`~dask_amlcompute.connect.unavailable_paths`).
"""

from __future__ import annotations

from typing import Any

from ..exceptions import SchedulerUnreachableError


def pick_node(nodes: list[dict[str, Any]], job_name: str, private_ip: str) -> dict[str, Any] | None:
    """The node running ``job_name`` whose private IP is ``private_ip`` (else any of the job's)."""
    mine = [n for n in nodes if n.get("runId") == job_name]
    same_ip = [n for n in mine if n.get("privateIpAddress") == private_ip]
    return (same_ip or mine)[0] if same_ip or len(mine) == 1 else None


async def open_scheduler_tunnel(
    context: Any, job_name: str, private_ip: str, targets: dict[str, tuple[str, int]]
):
    """Open and return a started SSHTunnel forwarding ``targets`` via the scheduler's node."""
    from .tunnel import SSHTunnel

    compute, settings = context.plan.compute, context.settings
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
        # one known_hosts entry per node (aml-<compute>-<nodeId>), not per ip:port: AML's public
        # endpoint is a shared load-balancer IP with a port per node; a new VM there has a new key
        host_key_alias=f"aml-{settings.compute}-{node.get('nodeId') or node['publicIpAddress']}",
    )
    await tunnel.start()
    context.log(
        f"SSH tunnel via {compute.admin_user}@{node['publicIpAddress']}:{node['port']} "
        f"to {private_ip}"
    )
    return tunnel
