"""Fixtures for the emulator's own tests: one shared emulator with several computes."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ssh_keypair() -> tuple[str, str]:
    """An ed25519 client key pair (private OpenSSH text, public authorized_keys line)."""
    from aml_emulator.ssh import generate_client_keypair

    return generate_client_keypair("emulator-tests")


@pytest.fixture(scope="session")
def emu(ssh_keypair):
    """A running emulator shared by the emulator tests.

    Computes: ``cpu-cluster`` (4 nodes, public SSH with ``ssh_keypair``), ``small``
    (2 nodes, for queueing), ``warm`` (min 1 node), ``my-ci`` (ComputeInstance),
    ``aks`` (Kubernetes, reported only).
    """
    from aml_emulator import ComputeSpec, Emulator, EnvironmentSpec

    computes = [
        ComputeSpec(name="cpu-cluster", max_nodes=4, ssh_public_keys=[ssh_keypair[1]]),
        ComputeSpec(name="small", max_nodes=2, ssh_public_access=False),
        ComputeSpec(
            name="warm",
            max_nodes=2,
            min_nodes=1,
            idle_seconds_before_scaledown=1,
            vm_priority="LowPriority",
        ),
        ComputeSpec(name="my-ci", kind="ComputeInstance"),
        ComputeSpec(name="aks", kind="Kubernetes"),
    ]
    environments = [
        EnvironmentSpec(name="dask-env", version="1", image="python:3.10"),
        EnvironmentSpec(name="dask-env", version="2", image="python:3.11"),
    ]
    with Emulator(computes=computes, environments=environments) as emulator:
        yield emulator


@pytest.fixture(scope="session")
def ml(emu):
    """A real MLClient pointed at the shared emulator."""
    return emu.ml_client()
