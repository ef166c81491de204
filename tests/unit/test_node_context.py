"""Rank detection from the variables AML sets (PyTorch and MPI styles)."""

from __future__ import annotations

import pytest

from dask_amlcompute.node.entry import detect_context


def test_pytorch_variables():
    env = {
        "MASTER_ADDR": "127.0.3.1", "MASTER_PORT": "6105", "WORLD_SIZE": "3",
        "NODE_RANK": "2", "RANK": "2", "LOCAL_RANK": "0", "AZUREML_RUN_ID": "job-1",
        "AZ_BATCHAI_NODE_IP": "127.0.3.3",
    }  # fmt: skip
    ctx = detect_context(env)
    assert (ctx.rank, ctx.world_size, ctx.master_addr, ctx.node_ip) == (
        2,
        3,
        "127.0.3.1",
        "127.0.3.3",
    )
    assert ctx.job_name == "job-1"


def test_mpi_variables():
    env = {
        "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4",
        "AZ_BATCH_MASTER_NODE": "127.0.4.1:6105", "AZ_BATCHAI_NODE_IP": "127.0.4.2",
    }  # fmt: skip
    ctx = detect_context(env)
    assert (ctx.rank, ctx.world_size, ctx.master_addr, ctx.node_ip) == (
        1,
        4,
        "127.0.4.1",
        "127.0.4.2",
    )
    env = {
        "OMPI_COMM_WORLD_RANK": "0",
        "OMPI_COMM_WORLD_SIZE": "2",
        "AZ_BATCHAI_MPI_MASTER_NODE": "127.0.4.1",
    }
    ctx = detect_context(env)
    assert (ctx.rank, ctx.master_addr, ctx.node_ip) == (0, "127.0.4.1", "127.0.4.1")


def test_single_node_job_is_rank_zero():
    ctx = detect_context({"AZ_BATCHAI_NODE_IP": "127.0.5.1"})
    assert (ctx.rank, ctx.world_size, ctx.master_addr) == (0, 1, "127.0.5.1")


def test_rank_above_zero_without_master_is_an_error():
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        detect_context({"NODE_RANK": "1", "WORLD_SIZE": "2"})


def test_a_node_never_publishes_loopback_unless_its_master_is_on_loopback():
    import ipaddress

    # no master (AML may leave MASTER_ADDR unset on one node): the host name's address,
    # looked up, never routed to 127.0.0.1; loopback (this machine's name) is refused
    try:
        ctx = detect_context({"AZUREML_NODE_COUNT": "1"})
    except RuntimeError as exc:
        assert "no address other machines can reach" in str(exc)
    else:
        assert not ipaddress.ip_address(ctx.node_ip).is_loopback
        assert ctx.master_addr == ctx.node_ip
    # the master named by AML is this node's address on rank 0 (no lookup, no dial)
    ctx = detect_context({"MASTER_ADDR": "10.0.4.1", "NODE_RANK": "0", "WORLD_SIZE": "2"})
    assert (ctx.node_ip, ctx.master_addr) == ("10.0.4.1", "10.0.4.1")
    # nodes sharing a loopback (the emulator's): the route to the master is loopback, kept
    ctx = detect_context({"MASTER_ADDR": "127.0.6.1", "NODE_RANK": "1", "WORLD_SIZE": "2"})
    assert ipaddress.ip_address(ctx.node_ip).is_loopback
