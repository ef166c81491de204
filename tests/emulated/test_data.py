"""AML datastores on the cluster: URI resolution, adlfs storage options, secrets kept out of sight.

Integration tests run a real Azurite (npm ``azurite``) behind the emulator's
datastores; a missing Azurite is a test failure with install instructions,
never a skip (CI installs it).
"""

from __future__ import annotations

import logging
import pickle
import re
from urllib.parse import parse_qs

import pytest

from dask_amlcompute.data import (
    DatastoreCredentialsError,
    DatastoreNotFoundError,
    DatastoreURIError,
    ResolvedURI,
    StorageOptions,
    parse_uri,
    redact,
    resolve,
)

ARM_SCOPE = "https://management.azure.com/.default"  # what the SDK asks its credential for

# ------------------------------------------------------------------ unit tests (no services)


def test_parse_short_and_long_forms():
    short = parse_uri("azureml://datastores/lake/paths/sales/2024/*.parquet")
    assert (short.datastore, short.path, short.workspace) == ("lake", "sales/2024/*.parquet", None)
    long = parse_uri(
        "azureml://subscriptions/s1/resourcegroups/rg1/workspaces/ws1/datastores/lake/paths/a/b.csv"
    )
    assert (long.subscription_id, long.resource_group, long.workspace) == ("s1", "rg1", "ws1")
    assert (long.datastore, long.path) == ("lake", "a/b.csv")
    arm = parse_uri(
        "azureml://subscriptions/s1/resourceGroups/rg1/providers/"
        "Microsoft.MachineLearningServices/workspaces/ws1/datastores/lake/paths/x"
    )
    assert (arm.workspace, arm.path) == ("ws1", "x")
    assert parse_uri("azureml://datastores/lake").path == ""
    assert parse_uri("azureml://datastores/lake/paths/").path == ""


@pytest.mark.parametrize(
    "bad",
    [
        "abfs://container/path",
        "azureml://datastores/",
        "azureml://datastores/lake/files/x",
        "azureml://subscriptions/s/workspaces/w/datastores/d/paths/x",
        "azureml:my-data:1",
        "",
    ],
)
def test_malformed_uris_name_the_accepted_forms(bad):
    with pytest.raises(DatastoreURIError, match="azureml://datastores/<name>/paths/<path>"):
        parse_uri(bad)


def test_storage_options_and_resolved_uri_mask_secrets():
    key = "c2VjcmV0LWtleS12YWx1ZS10aGF0LW11c3Qtbm90LWxlYWs="
    opts = StorageOptions(account_name="acct", account_key=key)
    resolved = ResolvedURI(
        "abfs://c@acct.dfs.core.windows.net/a/b",
        opts,
        uri="azureml://datastores/d/paths/a/b",
        datastore="d",
        credential="account_key",
    )
    for text in (repr(opts), str(opts), repr(resolved), str(resolved), f"{resolved}"):
        assert key not in text and "***" in text
    assert opts["account_key"] == key  # still a working mapping
    assert pickle.loads(pickle.dumps(opts)) == opts
    url, options = resolved
    assert url == resolved.url and options is opts
    joined = resolved.join("..", "out", "summary.parquet")
    assert joined.url == "abfs://c@acct.dfs.core.windows.net/a/out/summary.parquet"
    assert joined.uri == "azureml://datastores/d/paths/a/out/summary.parquet"
    assert joined.storage_options is opts


def test_redact_masks_keys_and_sas():
    text = (
        "DefaultEndpointsProtocol=http;AccountName=a;AccountKey=abc123==;BlobEndpoint=x; "
        "https://a.blob.core.windows.net/c?sv=2024&sig=SIGVALUE%3D&se=1 BlobEndpoint=y;"
        "SharedAccessSignature=sv=1&sig=zz"
    )
    out = redact(text)
    for secret in ("abc123==", "SIGVALUE", "zz"):
        assert secret not in out


def test_sdk_log_lines_are_redacted_by_the_filter_the_library_installs(caplog):
    caplog.set_level(logging.DEBUG)
    logging.getLogger("urllib3.connectionpool").debug(
        '%s://%s:%s "%s %s %s" %s %s',
        *("https", "acct.blob.core.windows.net", 443, "PUT", "/c/x?sv=1&sig=SIGVALUE%3D&se=2"),
        *("HTTP/1.1", 201, 0),
    )
    trace = logging.getLogger("azure.core.pipeline.policies._universal")
    trace.debug("    %r: %r", "Authorization", "Bearer eyJ0eXAi.eyJhdWQi.c2ln")
    trace.debug('{"KEY": "-----BEGIN PRIVATE KEY-----\\nMIIEv\\n-----END PRIVATE KEY-----\\n"}')
    text = caplog.text
    # masked by ours, or first by mlflow's own filter ("[REDACTED]") once mlflow was imported
    assert re.search(r"sig=(\*\*\*|\[REDACTED\])&se=2", text), text
    assert "Bearer ***" in text and "PRIVATE KEY-----***" in text
    assert "SIGVALUE" not in text and "eyJ" not in text and "MIIEv" not in text


# --------------------------------------------------------- Azurite + emulator (module scoped)


@pytest.fixture(scope="module")
def azurite():
    from aml_emulator.azurite import Azurite, AzuriteNotFoundError

    try:
        with Azurite() as service:
            yield service
    except AzuriteNotFoundError as exc:  # CI installs it: a missing Azurite is a failure
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="module")
def datastores(azurite):
    from aml_emulator import DatastoreSpec

    return [
        azurite.datastore("lake", container="data", is_default=True),
        azurite.datastore("sasstore", container="sasdata", credential="sas"),
        azurite.datastore("idstore", container="iddata", credential="none"),
        # references to "real" accounts: resolved offline, never contacted
        DatastoreSpec(
            name="cloudkey",
            account="prodacct",
            container="raw",
            endpoint="core.windows.net",
            account_key="cHJvZC1rZXktc2VjcmV0LXZhbHVl",
        ),
        DatastoreSpec(
            name="cloudid",
            account="prodacct",
            container="raw",
            credential="none",
            kind="AzureDataLakeGen2",
        ),
        DatastoreSpec(
            name="chinaid",
            account="cnacct",
            container="raw",
            credential="none",
            endpoint="core.chinacloudapi.cn",
        ),
    ]


@pytest.fixture(scope="module")
def data_emulator(datastores):
    from aml_emulator import ComputeSpec, Emulator

    with Emulator(
        computes=[ComputeSpec(name="cpu-cluster", max_nodes=4)], datastores=datastores
    ) as emu:
        yield emu


@pytest.fixture(scope="module")
def data_client(data_emulator):
    return data_emulator.ml_client()


def _secrets(azurite, datastores):
    sas = next(d.sas_token for d in datastores if d.name == "sasstore")
    return [azurite.account_key, sas, parse_qs(sas)["sig"][0]]


def test_azurite_without_npm_says_how_to_install_it(tmp_path, monkeypatch):
    from aml_emulator.azurite import AzuriteNotFoundError, install_azurite

    monkeypatch.setenv("PATH", str(tmp_path))  # no npm here
    with pytest.raises(AzuriteNotFoundError, match="npm is not on PATH") as err:
        install_azurite(prefix=tmp_path / "azurite")
    assert "npm install -g azurite@" in str(err.value)
    assert not (tmp_path / "azurite").exists()


def test_azurite_is_installed():
    """FAILS (never skips) without Azurite, saying how to install it."""
    from aml_emulator.azurite import AzuriteNotFoundError, find_azurite

    try:
        assert find_azurite()
    except AzuriteNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)


def test_azurite_serves_blobs(azurite):
    azurite.create_container("probe")
    with azurite.blob_service_client() as service:
        service.get_container_client("probe").upload_blob("hello.txt", b"hi", overwrite=True)
        assert "probe" in {c.name for c in service.list_containers()}
        assert service.get_blob_client("probe", "hello.txt").download_blob().readall() == b"hi"


def test_emulator_serves_datastores_to_the_sdk(data_client, azurite):
    stores = {d.name: d for d in data_client.datastores.list()}
    assert {"lake", "sasstore", "idstore", "cloudkey"} <= set(stores)
    lake = data_client.datastores.get("lake")
    assert (lake.account_name, lake.container_name) == ("devstoreaccount1", "data")
    assert lake.endpoint == azurite.blob_endpoint
    assert lake.credentials.account_key is None  # GET carries no secret
    assert data_client.datastores.get("lake", include_secrets=True).credentials.account_key
    assert data_client.datastores.get_default().name == "lake"
    assert data_client.datastores.get("cloudid").filesystem == "raw"


def test_resolve_both_forms_to_the_same_location(data_emulator, data_client):
    short = resolve("azureml://datastores/lake/paths/in/x.parquet", data_client)
    long = resolve(
        f"azureml://subscriptions/{data_emulator.subscription_id}/resourcegroups/"
        f"{data_emulator.resource_group}/workspaces/{data_emulator.workspace_name}/"
        "datastores/lake/paths/in/x.parquet",
        data_client,
    )
    assert short.url == long.url == "abfs://data/in/x.parquet"
    assert short.storage_options == long.storage_options
    assert short.credential == "account_key"
    assert resolve("azureml://datastores/sasstore/paths/a", data_client).credential == "sas"


def test_resolve_real_azure_shapes_offline(data_client):
    key = resolve("azureml://datastores/cloudkey/paths/p/q", data_client)
    assert key.url == "abfs://raw@prodacct.dfs.core.windows.net/p/q"
    assert dict(key.storage_options) == {
        "account_name": "prodacct",
        "account_key": "cHJvZC1rZXktc2VjcmV0LXZhbHVl",
    }
    ident = resolve("azureml://datastores/cloudid/paths/p", data_client)
    assert ident.credential == "identity"
    assert dict(ident.storage_options) == {"account_name": "prodacct", "anon": False}
    forced = resolve(
        "azureml://datastores/cloudkey/paths/p",
        data_client,
        identity=True,
        identity_client_id="11111111-2222-3333-4444-555555555555",
    )
    assert "account_key" not in forced.storage_options
    assert forced.storage_options["managed_identity_client_id"].startswith("1111")
    china = resolve("azureml://datastores/chinaid/paths/p", data_client)
    assert china.url == "abfs://raw/p"
    assert china.storage_options["account_host"] == "cnacct.blob.core.chinacloudapi.cn"


def test_unknown_datastore_lists_the_existing_ones(data_client):
    with pytest.raises(DatastoreNotFoundError) as info:
        resolve("azureml://datastores/lakee/paths/x", data_client)
    message = str(info.value)
    assert "'lakee'" in message and "lake, " in message and "sasstore" in message


def test_missing_credentials_are_a_clear_error(data_client):
    with pytest.raises(DatastoreCredentialsError, match="account key or a SAS token"):
        resolve("azureml://datastores/idstore/paths/x", data_client)
    with pytest.raises(DatastoreCredentialsError, match="identity=False"):
        resolve("azureml://datastores/cloudid/paths/x", data_client, identity=False)
    with pytest.raises(DatastoreCredentialsError, match="Azure AD identities cannot be used"):
        resolve("azureml://datastores/lake/paths/x", data_client, identity=True)


def test_throttled_datastore_lookups_are_retried(data_emulator):
    from azure.ai.ml import MLClient

    from aml_emulator.client import EmulatorTransport

    emu = data_emulator  # a user's own client: azure-core's default 3 status retries
    ml = MLClient(
        emu.credential(),
        emu.subscription_id,
        emu.resource_group,
        emu.workspace_name,
        transport=EmulatorTransport(emu.base_url),
    )
    emu.inject_http_errors(6, status=429, retry_after=0.1)  # outlasts azure-core's retries
    r = resolve("azureml://datastores/lake/paths/x", ml)  # the secrets lookup is throttled too
    assert r.credential == "account_key" and emu.pending_http_errors() == 0


def test_other_workspace_in_long_form_is_refused(data_client):
    with pytest.raises(DatastoreURIError, match="pass an MLClient for that workspace"):
        resolve(
            "azureml://subscriptions/s/resourcegroups/rg/workspaces/other/datastores/lake/paths/x",
            data_client,
        )


def test_no_secret_in_reprs_errors_or_logs(data_client, azurite, datastores, caplog):
    secrets = _secrets(azurite, datastores)
    caplog.set_level(logging.DEBUG)
    texts = []
    for name in ("lake", "sasstore", "cloudkey"):
        r = resolve(f"azureml://datastores/{name}/paths/x", data_client)
        texts += [repr(r), str(r), repr(r.storage_options), str(r.storage_options)]
    for bad in ("azureml://datastores/nope/paths/x", "azureml://datastores/idstore/paths/x"):
        with pytest.raises(Exception) as info:
            resolve(bad, data_client)
        texts.append(str(info.value))
    texts.append(caplog.text)
    texts.append(repr(datastores))
    blob = "\n".join(texts)
    for secret in [*secrets, "cHJvZC1rZXktc2VjcmV0LXZhbHVl"]:
        assert secret not in blob


# --------------------------------------------------------------- a real cluster on the emulator


@pytest.mark.slow
def test_cluster_reads_aggregates_and_writes_back(
    data_emulator, data_client, azurite, datastores, cluster_kwargs
):
    import dask.dataframe as dd
    import fsspec
    import numpy as np
    import pandas as pd
    from distributed import Client

    from dask_amlcompute import AmlComputeCluster

    src = resolve("azureml://datastores/lake/paths/sales/", data_client)
    # The client writes the input through adlfs: 4 parquet files.
    fs = fsspec.filesystem("abfs", **src.storage_options)
    rng = np.random.default_rng(0)
    frames = [
        pd.DataFrame({"shop": rng.integers(0, 5, 500), "amount": rng.random(500)}) for _ in range(4)
    ]
    for i, frame in enumerate(frames):
        with fs.open(f"{src.url}part-{i}.parquet", "wb") as fh:
            frame.to_parquet(fh)
    expected = pd.concat(frames).groupby("shop").amount.sum().sort_index()
    long_uri = (
        f"azureml://subscriptions/{data_emulator.subscription_id}/resourcegroups/"
        f"{data_emulator.resource_group}/workspaces/{data_emulator.workspace_name}/"
        "datastores/lake/paths/sales/"
    )

    with (
        AmlComputeCluster(data_client, n_nodes=2, **cluster_kwargs) as cluster,
        Client(cluster) as client,
    ):
        assert len(client.scheduler_info()["workers"]) == 2
        job_spec = repr(cluster.job_spec())
        # The read runs on the workers (tasks of the graph); the client only gets the sums.
        df = dd.read_parquet(src.url, storage_options=src.storage_options)
        assert df.npartitions == 4
        got = df.groupby("shop").amount.sum().compute().sort_index()
        np.testing.assert_allclose(got.to_numpy(), expected.to_numpy())
        # Both URI forms reach the same data from the nodes.
        long = resolve(long_uri, data_client)
        assert len(dd.read_parquet(long.url, storage_options=long.storage_options)) == 2000
        # The workers write the result back; a second (SAS) datastore works too.
        out = src.join("..", "summary")
        summary = df.groupby("shop").amount.agg(["sum", "count"])
        summary.to_parquet(out.url, storage_options=out.storage_options)
        sas = resolve("azureml://datastores/sasstore/paths/copy/", data_client)
        df.to_parquet(sas.url, storage_options=sas.storage_options)
        assert len(dd.read_parquet(sas.url, storage_options=sas.storage_options)) == 2000
        who = client.run(lambda: __import__("adlfs").__name__)
        assert len(who) == 2
        logs = str(cluster.get_logs())
        job = cluster.main_job_name

    # The client reads the result back directly from storage.
    back = pd.read_parquet(out.url, storage_options=dict(out.storage_options)).sort_index()
    np.testing.assert_allclose(back["sum"].to_numpy(), expected.to_numpy())
    assert back["count"].sum() == 2000

    node_logs = "\n".join(data_emulator.node_log(job, rank) for rank in range(2))
    for secret in _secrets(azurite, datastores):
        assert secret not in node_logs
        assert secret not in job_spec
        assert secret not in logs


@pytest.mark.slow
def test_debug_logs_of_a_tls_cluster_with_code_and_a_sas_datastore_hold_no_secret(
    data_emulator, azurite, datastores, cluster_kwargs, caplog, tmp_path
):
    import uuid

    import fsspec
    from distributed import Client

    from dask_amlcompute import AmlComputeCluster

    caplog.set_level(logging.DEBUG)  # every logger, the SDK's network trace included
    ml = data_emulator.ml_client(logging_enable=True)
    (tmp_path / "mymod.py").write_text(f"TOKEN = {uuid.uuid4().hex!r}\n")  # a new snapshot
    with AmlComputeCluster(ml, security=True, code=tmp_path, **cluster_kwargs) as cluster:
        sas = resolve("azureml://datastores/sasstore/paths/logs/", ml)
        fsspec.filesystem("abfs", **sas.storage_options).pipe(f"{sas.url}a.txt", b"x")
        cluster.scale(2)
        with Client(cluster) as client:
            client.wait_for_workers(2, timeout=60)
        tls_key = cluster.security.tls_scheduler_key
    text = caplog.text
    assert "PRIVATE KEY-----" in tls_key
    for secret in [*_secrets(azurite, datastores), tls_key.splitlines()[1]]:
        assert secret not in text
    # the snapshot's upload URLs (a write SAS) were logged, with their signature masked
    assert re.search(r"[?&]sig=(\*\*\*|\[?REDACTED)", text)
    # A JWT is header.payload.signature, both halves base64 JSON ("eyJ"). A bare `eyJ\w+`
    # also matched inside the public TLS certificate's base64, which the job carries (CI, stop 32).
    jwt = r"eyJ[\w-]+\.eyJ[\w-]+\.[\w-]*"
    assert re.fullmatch(jwt, data_emulator.credential().get_token(ARM_SCOPE).token)
    leaks = re.findall(
        rf"[?&]sig=(?!\*\*\*|\[?REDACTED)[^&\s'\"]+|Bearer (?!\*\*\*)\S+|{jwt}", text
    )
    assert not leaks
    assert "AccountKey=" not in text.replace("AccountKey=***", "")
