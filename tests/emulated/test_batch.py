"""map_batches / iter_batches: on an in-process LocalCluster (fast) and on an AmlComputeCluster."""

from __future__ import annotations

import json
import threading
import time
import warnings
from pathlib import Path

import pytest
from distributed import Client, LocalCluster, get_worker

from dask_amlcompute.batch import ItemError, iter_batches, map_batches
from dask_amlcompute.exceptions import ConfigurationError, ErrorThresholdExceededError


@pytest.fixture(scope="module")
def client():
    with (
        LocalCluster(
            processes=False, n_workers=2, threads_per_worker=2, dashboard_address=":0"
        ) as cluster,
        Client(cluster, set_as_default=False) as c,
    ):
        yield c


def fail_every_100th(x):
    if x % 100 == 42:
        raise ValueError(f"bad input {x}")
    return x * 2


def test_10k_inputs_ordered_with_per_item_errors(client):
    results = map_batches(fail_every_100th, range(10_000), client=client, progress=False)
    assert len(results) == 10_000
    errors = [r for r in results if isinstance(r, ItemError)]
    assert [e.index for e in errors] == list(range(42, 10_000, 100))
    assert errors[0].type == "ValueError" and errors[0].message == "bad input 42"
    assert "fail_every_100th" in errors[0].traceback and errors[0].worker
    assert isinstance(errors[0].exception, ValueError)
    assert all(r == 2 * i for i, r in enumerate(results) if not isinstance(r, ItemError))
    with pytest.raises(ValueError, match="bad input 42"):
        errors[0].reraise()


def test_threshold_aborts_and_keeps_completed_results(client, capsys):
    with pytest.raises(ErrorThresholdExceededError, match="error_threshold=5") as info:
        map_batches(
            fail_every_100th,
            range(10_000),
            client=client,
            batch_size=100,
            max_in_flight=2,
            error_threshold=5,
        )
    exc = info.value
    assert len(exc.errors) == 6 and all(isinstance(e, ItemError) for e in exc.errors.values())
    assert exc.stats.failed == 6 and len(exc.results) == exc.stats.done
    assert 0 < len(exc.results) < 10_000 - 6  # stopped early
    assert all(v == 2 * i for i, v in exc.results.items())
    assert "First failure: input 42: ValueError" in str(exc)
    assert "6 failed" in capsys.readouterr().err  # final summary


def test_fractional_threshold(client):
    results = map_batches(fail_every_100th, range(1000), client=client, error_threshold=0.02)
    assert sum(isinstance(r, ItemError) for r in results) == 10
    with pytest.raises(ErrorThresholdExceededError):
        map_batches(fail_every_100th, range(1000), client=client, error_threshold=0.005)
    with pytest.raises(ConfigurationError, match="fraction"):
        list(iter_batches(fail_every_100th, iter(range(10)), client=client, error_threshold=0.5))


def test_hung_call_is_abandoned_and_others_complete(client):
    def hang_on_3(x):
        if x == 3:
            while True:  # pure Python: interrupted after the time limit
                time.sleep(0.01)
        return x

    run = iter_batches(hang_on_3, range(10), client=client, batch_size=5, timeout=0.5)
    by_index = {i: r for b in run for i, r in zip(b.indices, b.results, strict=True)}
    assert [by_index[i] for i in range(10) if i != 3] == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert isinstance(by_index[3], ItemError) and by_index[3].timed_out
    assert "time limit of 0.5s" in by_index[3].message
    assert run.stats.timed_out == 1 and run.stats.failed == 1
    deadline = time.monotonic() + 5  # the abandoned thread was interrupted
    while any(t.name == "dask-amlcompute-batch" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "abandoned thread still running"
        time.sleep(0.05)


def test_retries_succeed_on_flaky_function(client, tmp_path):
    def flaky(x):  # fails the first attempt of every odd input (state in files)
        marker = tmp_path / f"seen-{x}"
        if x % 2 and not marker.exists():
            marker.touch()
            raise OSError(f"transient {x}")
        return x

    run = iter_batches(flaky, range(40), client=client, batch_size=8, retries=1, progress=False)
    results = sorted(r for b in run for r in b.results)
    assert results == list(range(40))
    assert run.stats.retried == 20 and run.stats.failed == 0
    no_retry = map_batches(flaky, range(40, 44), client=client, progress=False)
    assert [isinstance(r, ItemError) for r in no_retry] == [False, True, False, True]
    assert no_retry[1].attempts == 1


INIT_CALLS: list[str] = []  # module level: functions are pickled by reference


def init_offset():
    INIT_CALLS.append(get_worker().address)
    return {"offset": 1000}


def test_init_runs_once_per_worker_and_feeds_fn(client):
    INIT_CALLS.clear()
    results = map_batches(
        lambda x, state: x + state["offset"],
        range(500),
        client=client,
        batch_size=10,
        init=init_offset,
    )
    assert results == [x + 1000 for x in range(500)]
    assert len(INIT_CALLS) == len(set(INIT_CALLS)) and 1 <= len(INIT_CALLS) <= 2
    workers = client.cluster.workers.values()
    assert not any(getattr(w, "_dask_amlcompute_batch_state", {}) for w in workers)


def test_failing_init_is_reported_per_item(client):
    def init():
        raise RuntimeError("no model")

    results = map_batches(lambda x, s: x, range(4), client=client, init=init, progress=False)
    assert all(isinstance(r, ItemError) and "init failed" in r.message for r in results)


def test_streaming_bounds_in_flight_batches_and_reads_lazily(client):
    pulled = 0

    def source():
        nonlocal pulled
        for i in range(2000):
            pulled += 1
            yield i

    run = iter_batches(
        lambda x: x, source(), client=client, batch_size=20, max_in_flight=3, progress=False
    )
    seen = 0
    for batch in run:
        seen += len(batch.indices)
        assert pulled - seen <= 3 * 20  # never more than max_in_flight batches read ahead
        assert sorted(batch.results) == batch.indices
    assert seen == 2000 and run.stats.max_in_flight == 3 and run.stats.batches == 100


def test_output_dir_json_and_parquet(client, tmp_path):
    files = map_batches(
        fail_every_100th, range(250), client=client, batch_size=100, output_dir=tmp_path / "j"
    )
    assert [f.name for f in files] == [f"batch-{i:06d}.json" for i in range(3)]
    data = json.loads(files[0].read_text())
    assert data["items"][41] == {"index": 41, "result": 82}
    assert data["items"][42]["error"]["type"] == "ValueError"

    import pandas as pd  # the test extra installs it: a missing one must fail
    import pyarrow  # noqa: F401

    files = map_batches(
        lambda x: pd.DataFrame({"x": [x], "sq": [x * x]}),
        range(30),
        client=client,
        batch_size=10,
        output_dir=tmp_path / "p",
        progress=False,
    )
    assert [Path(f).suffix for f in files] == [".parquet"] * 3
    df = pd.concat(pd.read_parquet(f) for f in files)
    assert sorted(df["_item"]) == list(range(30)) and (df["sq"] == df["x"] ** 2).all()


# -- on an AmlComputeCluster (emulator) ---------------------------------------------------


@pytest.fixture(scope="module")
def aml_client(ml_client):
    from dask_amlcompute import AmlComputeCluster

    with (
        AmlComputeCluster(
            ml_client,
            compute="cpu-cluster",
            n_nodes=2,
            threads_per_process=2,
            # joblib and scikit-learn run on the workers: the node environment must list them
            pip_packages=["joblib", "scikit-learn"],
            job_timeout="10m",
            startup_timeout="90s",
            poll_interval=0.2,
            death_timeout="60s",
            quiet=True,
        ) as cluster,
        Client(cluster, set_as_default=False) as c,
    ):
        yield c


@pytest.mark.slow
def test_batches_on_aml_cluster(aml_client, tmp_path):
    def square_or_fail(x):
        if x in (17, 4242):
            raise KeyError(x)
        return x * x

    results = map_batches(square_or_fail, range(10_000), client=aml_client, progress=False)
    assert [i for i, r in enumerate(results) if isinstance(r, ItemError)] == [17, 4242]
    assert all(r == i * i for i, r in enumerate(results) if i not in (17, 4242))
    assert {results[17].worker, results[4242].worker} <= set(aml_client.scheduler_info()["workers"])

    def init():  # records each call in a file: nodes share this machine's filesystem
        name = get_worker().name
        (tmp_path / f"init-{name}-{time.monotonic_ns()}").touch()
        return name

    def flaky(x, worker_name):
        marker = tmp_path / f"seen-{x}"
        if x % 10 == 0 and not marker.exists():
            marker.touch()
            raise ConnectionError(f"flaky {x}")
        if x == 55:
            while True:  # hung: abandoned at the batch time limit
                time.sleep(0.01)
        return worker_name

    run = iter_batches(
        flaky, range(200), client=aml_client, batch_size=20, retries=1, timeout=2, init=init
    )
    out = {i: r for b in run for i, r in zip(b.indices, b.results, strict=True)}
    assert run.stats.retried == 20 + 1  # every multiple of 10 once, and the hung input
    assert run.stats.failed == 1 and run.stats.timed_out == 1 and out[55].timed_out
    inits = sorted(p.name.rsplit("-", 1)[0] for p in tmp_path.glob("init-*"))
    assert inits == sorted(set(inits)) and len(inits) == 2  # once per worker
    assert {r for i, r in out.items() if i != 55} <= {i.removeprefix("init-") for i in inits}


@pytest.mark.slow
def test_joblib_dask_backend_on_aml_cluster(aml_client):
    import joblib

    def where(x):
        return x * x, get_worker().name

    with joblib.parallel_backend("dask", client=aml_client):
        out = joblib.Parallel(batch_size=4)(joblib.delayed(where)(i) for i in range(64))
    assert [v for v, _ in out] == [i * i for i in range(64)]
    assert all(name.startswith("dask-") for _, name in out)  # ran on the cluster's workers


@pytest.mark.slow
def test_sklearn_grid_search_on_aml_cluster(aml_client):
    import joblib
    import sklearn  # noqa: F401
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV

    x, y = make_classification(n_samples=200, n_features=8, random_state=0)
    search = GridSearchCV(LogisticRegression(max_iter=200), {"C": [0.01, 0.1, 1, 10]}, cv=3)
    # scikit-learn ships the client's warning filters with every task, and this project's
    # pytest config adds filters naming marshmallow's classes, a package the nodes do not
    # have (see NODE_HELPERS on strictyaml, the same effect from azure-ai-ml): drop them here
    with warnings.catch_warnings():
        warnings.filters[:] = [f for f in warnings.filters if "marshmallow" not in str(f[2])]
        with joblib.parallel_backend("dask", client=aml_client):
            search.fit(x, y)
    assert search.best_params_["C"] in (0.01, 0.1, 1, 10) and search.best_score_ > 0.6
