"""TLS between client, scheduler and workers with temporary credentials (real processes)."""

from __future__ import annotations

import pytest
from distributed import Client

from dask_amlcompute import AmlComputeCluster
from dask_amlcompute.cluster import SECRET_IN_JOB_BODY

pytestmark = pytest.mark.slow


def test_tls_cluster_runs_and_rejects_a_client_without_the_certificate(
    emulator, ml_client, cluster_kwargs
):
    with AmlComputeCluster(ml_client, n_nodes=2, security=True, **cluster_kwargs) as cluster:
        assert cluster.scheduler_address.startswith("tls://")
        # the key never shows in what the library prints; the preview says where it is
        env = cluster.job_spec()["properties"]["environmentVariables"]
        assert env["DASK_AMLCOMPUTE_TLS_KEY"] == SECRET_IN_JOB_BODY
        assert "plain text" in SECRET_IN_JOB_BODY
        assert "PRIVATE KEY" not in repr(cluster)
        with Client(cluster) as client:  # picks up cluster.security
            workers = client.scheduler_info()["workers"]
            assert len(workers) == 2 and all(a.startswith("tls://") for a in workers)
            assert sum(client.gather(client.map(lambda x: x + 1, range(20)))) == 210
        plain = cluster.scheduler_address.replace("tls://", "tcp://")
        with pytest.raises((OSError, TimeoutError)):
            Client(plain, timeout="3s")
        # a client with some other certificate is refused as well
        from distributed.security import Security

        with pytest.raises((OSError, TimeoutError)):
            Client(cluster.scheduler_address, security=Security.temporary(), timeout="3s")
    assert emulator.wait_job(cluster.main_job_name, timeout=30) in ("Completed", "Canceled")
