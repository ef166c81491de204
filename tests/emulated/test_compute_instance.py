"""A client on an AML compute instance gets a dashboard link its browser can open."""

from __future__ import annotations

import asyncio
import urllib.request

import dask
import pytest

from dask_amlcompute import AmlComputeCluster, ConfigurationError
from dask_amlcompute.connect.instance import (
    PUBLISHED_PORTS,
    PortRelay,
    detect_compute_instance,
)


def test_detection_reads_the_file_aml_writes_and_config_overrides_it(tmp_path):
    nbvm = tmp_path / ".nbvm"
    nbvm.write_text("instance=my-ci\ndomainsuffix=westeurope.instances.azureml.ms\nother=1\n")
    with dask.config.set({"amlcompute.compute-instance-file": str(nbvm)}):
        found = detect_compute_instance()
        assert found == ("my-ci", "westeurope.instances.azureml.ms")
        with dask.config.set({"amlcompute.compute-instance": False}):
            assert detect_compute_instance() is None  # turned off
        nbvm.write_text("instance=\"my-ci\"\ndomainsuffix='westeurope.instances.azureml.ms'\n")
        assert detect_compute_instance() == found  # shell-style quotes are not part of it
    with dask.config.set({"amlcompute.compute-instance-file": str(tmp_path / "absent")}):
        assert detect_compute_instance() is None  # not an instance
    with dask.config.set(
        {"amlcompute.compute-instance": {"name": "ci2", "domain-suffix": "eastus.x.ms"}}
    ):
        assert detect_compute_instance() == ("ci2", "eastus.x.ms")
    with (
        dask.config.set({"amlcompute.compute-instance": {"name": "ci2"}}),
        pytest.raises(ConfigurationError, match="domain-suffix"),
    ):
        detect_compute_instance()


def test_relay_takes_the_next_free_published_port():
    async def main():
        first = PortRelay(("127.0.0.1", 9))
        second = PortRelay(("127.0.0.1", 9))
        try:
            a = await first.start()
            b = await second.start()
            assert a in PUBLISHED_PORTS and b in PUBLISHED_PORTS and a != b
        finally:
            await first.close()
            await second.close()

    asyncio.run(main())


@pytest.mark.slow
def test_dashboard_link_on_a_compute_instance_opens(ml_client, cluster_kwargs, tmp_path):
    nbvm = tmp_path / ".nbvm"
    nbvm.write_text("instance=my-ci\ndomainsuffix=westeurope.instances.azureml.ms\n")
    with (
        dask.config.set({"amlcompute.compute-instance-file": str(nbvm)}),
        AmlComputeCluster(ml_client, n_nodes=1, **cluster_kwargs) as cluster,
    ):
        link = cluster.dashboard_link
        relay = cluster._connector.relay
        assert relay is not None and relay.port in PUBLISHED_PORTS
        assert link == f"https://my-ci-{relay.port}.westeurope.instances.azureml.ms/status"
        # AML's proxy forwards that URL to the port on the instance: the dashboard answers there
        url = f"http://127.0.0.1:{relay.port}/health"
        assert urllib.request.urlopen(url, timeout=10).read() == b"ok"
        port = relay.port
    with pytest.raises(OSError):  # closing the cluster closed the relay
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
