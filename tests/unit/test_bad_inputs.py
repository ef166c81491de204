"""Every bad input is refused before anything reaches AML, with a typed error (issue #26).

A table of bad values for every parameter of the public entry points
(``AmlComputeCluster``, ``scale``, ``adapt``, ``map_batches``, ``submit_script``,
``from_name``), every ``amlcompute.*`` dask config key and the CLI commands. Each
case must raise a :class:`ConfigurationError` (an ``AmlComputeError``) while a
counting loopback HTTP server stands in for AML: no case may send it a request.
The ``test_*_covers_*`` tests introspect the signatures and the schema, so a new
parameter or setting without a bad-input case fails them. Unit tier: no cluster
starts (scale/adapt run on a cluster object that was never started).
"""

from __future__ import annotations

import asyncio
import inspect
import re
import signal
import threading
import time
from dataclasses import dataclass, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dask
import pytest

from aml_emulator import make_ml_client
from dask_amlcompute import (
    AccessDeniedError,
    AmlComputeCluster,
    AmlComputeError,
    ConfigurationError,
    submit_script,
)
from dask_amlcompute.batch import iter_batches, map_batches
from dask_amlcompute.cli import main as cli_main
from dask_amlcompute.config import ClusterSettings, config_key, schema

NOT_A_FILE = "/nonexistent/dask-amlcompute/x"


@dataclass(frozen=True)
class Case:
    """A bad value of one parameter (argument name, or dask config key) of one entry point."""

    entry: str
    param: str
    bad: Any

    @property
    def id(self) -> str:
        # no memory address (``<object object at 0x...>``): parallel workers collect the same ids
        return re.sub(r" at 0x[0-9a-f]+", "", f"{self.entry}:{self.param}={self.bad!r}")[:70]


#: Bad values of every setting: passed as arguments and as dask config values.
SETTINGS: dict[str, list[Any]] = {
    "compute": [42, "", "has space", "cpu\n", "x" * 300],
    "n_nodes": [0, -1, 2.0, True, "2", 10**9],
    "nodes_per_job": [0, "2", 10**6],
    "processes_per_node": [True, 0, 10**6],
    "threads_per_process": [0, 2.5, 10**9],
    "memory_limit": ["lots", "-4GiB", -0.5, 100, True, float("nan"), 10**30, "1e400"],
    "worker_on_scheduler": ["no", 1],
    "environment": ["my-env", "my-env@prod", "my env:1", "env:1\n", 42, ""],
    "job_timeout": ["soon", float("inf"), "1e400s", 0.1, -1, "P1M"],
    "startup_timeout": ["-5", None, 10**9],
    "prepare_timeout": ["eventually", 0],
    "experiment_name": ["bad/name", "exp\n", "", 7],
    "name": ["has space", "abc\n", "x" * 255, "-lead", "a\x00b"],
    "tags": [{"a": 1}, ["x"], {"": "empty"}, {"a\nb": "v"}, {"a": "x" * 200_000}, {"a": "v\n"}],
    "env_vars": [
        {"BAD NAME": "1"},
        {"A=B": "1"},
        {"A": 1},
        {"1ABC": "x"},
        "A=1",
        {"FOO\n": "1"},
        {"A": "a\x00b"},
        {"AZUREML_RUN_ID": "x"},
        {"MASTER_ADDR": "x"},
        {"DASK_AMLCOMPUTE_TLS_KEY": "x"},
    ],
    "distribution": ["horovod", 1],
    "scheduler_port": [70000, True, "8786"],
    "dashboard_port": [-1, 8787.0],
    "death_timeout": ["never", 0],
    "idle_timeout": [0, "later"],
    "no_client_timeout": ["later", -5],
    "first_contact_timeout": ["soon", -3],
    "queue_timeout": ["eventually", 0],
    "connect": ["telepathy", None, 3],
    "security": ["yes", 0],
    "ssh_key": [NOT_A_FILE, 42],
    "known_hosts": [42, "hosts\n"],
    "ssh_trust_on_first_use": [1, "true"],
    "poll_interval": [-1, 1e-9, "1ms", "often"],
    "watch_interval": ["often", 0.01],
    "scheduler_options": [["idle_timeout"], {"plugin": object()}, {"not a name": 1}],
    "worker_options": [{1: 2}, {"x": float("nan")}],
    "workspace_config": [NOT_A_FILE, 42],
    "pip_packages": ["scikit-learn", ["numpy>>1"], [""], ["a\nb"]],
    "conda_packages": [[1], "gcc", ["x" * 5000]],
    "node_package": ["", 3],
    "stack": ["everything", None],
    "version_check": ["maybe", True],
    "quiet": ["no", None],
    "create_compute": ["big", {"size": "Standard_D4s_v3", "max_nodes": 0}, {"size": "x!"}],
    "delete_compute_on_close": ["sometimes"],
    "instance_type": ["Standard_D4s_v3", "not a size"],  # the first: beside compute=
    "job_tier": ["premium", 1],
    "serverless_network": ["yes"],
    "worker_compute": [42, "bad name"],
    "gpu_workers": ["all", False],
}
#: Bad values of the dask config keys that are no cluster setting.
CLIENT_KEYS: dict[str, list[Any]] = {
    "compute-instance": ["yes", 3],
    "compute-instance-file": [42, ""],
}
#: Bad values of the constructor arguments that are no setting.
CLUSTER_ONLY: dict[str, list[Any]] = {
    "ml_client": ["x", object()],
    "asynchronous": ["yes"],
    "loop": ["loop"],
    "shutdown_on_close": ["no", None],
    "code": [123, NOT_A_FILE],
    "credential": ["secret"],
}
SCALE: dict[str, list[Any]] = {
    "n": [-1, True, 2.5, "3", 10**9],
    "memory": ["lots", -1.5],
    "cores": [-1, 2.5],
    "nodes": [-1, 10**6, "2"],
}
ADAPT: dict[str, list[Any]] = {
    "minimum": [-1, 2.5],
    "maximum": ["x", 10**9],
    "minimum_nodes": [-2],
    "maximum_nodes": [1.5],
    "interval": ["x", 0, 10**9],
    "wait_count": [0, 2.5],
    "target_duration": ["soon", -1],
}
BATCHES: dict[str, list[Any]] = {
    "fn": [3],
    "inputs": [5],
    "client": ["tcp://127.0.0.1:1"],
    "cluster": ["x"],
    "batch_size": [0, 2.5],
    "error_threshold": [-2, "x", 2.5, -0.5],
    "timeout": ["soon", float("inf")],
    "retries": [-1, True, 10**6],
    "init": [3],
    "progress": ["yes"],
    "output_dir": ["UNWRITABLE", 42],
    "output_format": ["xml"],
    "max_in_flight": [0],
    "total": [-1, "10"],
    "desc": [3],
}
SUBMIT: dict[str, list[Any]] = {
    "ml_client": ["x"],
    "script_path": [NOT_A_FILE, 123],
    "compute": [None, "bad name"],
    "n_nodes": [0, 10**9, "2"],
    "processes_per_node": [0],
    "threads_per_process": [-1],
    "script_args": ["a b", [1]],
    "job_timeout": [float("inf"), "1e400s"],
    "experiment_name": ["exp\n"],
    "name": ["abc\n", "x" * 300],
    "environment": ["my-env", 42],
    "pip_packages": [["numpy>>1"]],
    "conda_packages": ["gcc"],
    "node_package": [3],
    "env_vars": [{"FOO\n": "1"}, {"AZUREML_RUN_ID": "x"}, {"A": "\x00"}],
    "code": [123],
    "distribution": ["horovod"],
    "security": ["yes"],
    "idle_timeout": [0],
    "no_client_timeout": ["x"],
    "wait": ["no"],
    "wait_timeout": [-1],
    "wait_workers": [None, "soon"],
    "poll_interval": [1e-9],
    "quiet": ["no"],
}
FROM_NAME: dict[str, list[Any]] = {
    "name": [None, 42, "bad name", "x\n"],
    "ml_client": ["x"],
    "shutdown_on_close": ["no"],
    "asynchronous": [1],
    "kwargs": [{"n_nodez": 1}, {"connect": "telepathy"}],
}
#: CLI command lines that are usage errors: exit code 2, one message line, no traceback.
CLI: dict[str, list[list[str]]] = {
    "list": [["list", "--bogus"], ["list", "--workspace-config", NOT_A_FILE]],
    "logs": [["logs"], ["logs", "--lines", "-5", "x"], ["logs", "--lines", "many", "x"]],
    "down": [["down"], ["down", "x", "--all-mine"]],
    "demo": [["demo", "--nodes", "0"], ["demo", "--processes", "x"]],
    "env": [["env", "--format", "xml"], ["env", "--extra", "numpy>>1"]],
    "run": [
        ["run", "x.py", "--env-var", "NOEQUALS", "--emulator"],
        ["run", "x.py", "--nodes", "0"],
        ["run", "x.py", "--nodes", "2.5"],
        ["run", "--threads", "0", "x.py"],
        ["run", "x.py", "--emulator", "--no-wait"],
        ["run", NOT_A_FILE, "--compute", "c", "--workspace-config", NOT_A_FILE],
    ],
    "nonsense": [["nonsense"]],
}


def cases(entry: str, table: dict[str, list[Any]]) -> list[Case]:
    # None as an argument means "not given" (dask config decides); in dask config it is a value
    return [
        Case(entry, param, bad)
        for param, values in table.items()
        for bad in values
        if bad is not None or entry != "argument"
    ]


CASES = [
    *cases("argument", SETTINGS),
    *cases("dask config", SETTINGS),
    *cases("dask config", CLIENT_KEYS),
    *cases("cluster", CLUSTER_ONLY),
    *cases("scale", SCALE),
    *cases("adapt", ADAPT),
    *cases("map_batches", BATCHES),
    *cases("submit_script", SUBMIT),
    *cases("from_name", FROM_NAME),
]
CLI_CASES = cases("cli", CLI)


# -- coverage: a parameter or setting without a case fails here ----------------------------


def parameters(fn: Any, skip: tuple[str, ...] = ()) -> set[str]:
    """Public parameter names of ``fn`` (private ``_x``, ``self`` and ``skip`` left out)."""
    return {
        p.name
        for p in inspect.signature(fn).parameters.values()
        if not p.name.startswith("_") and p.name not in ("self", "cls", *skip)
        and p.kind is not inspect.Parameter.VAR_KEYWORD
    }  # fmt: skip


@pytest.mark.parametrize(
    "fn, table, extra",
    [
        (AmlComputeCluster.__init__, {**SETTINGS, **CLUSTER_ONLY}, set()),
        (AmlComputeCluster.scale, SCALE, set()),
        (AmlComputeCluster.adapt, ADAPT, set()),
        (iter_batches, BATCHES, set()),
        (map_batches, BATCHES, parameters(iter_batches)),  # **options: iter_batches'
        (submit_script, SUBMIT, set()),
        (AmlComputeCluster.from_name, FROM_NAME, {"kwargs"}),
    ],
    ids=["cluster", "scale", "adapt", "iter_batches", "map_batches", "submit_script", "from_name"],
)
def test_every_parameter_has_a_bad_input_case(fn, table, extra):
    missing = parameters(fn) - set(table)
    assert not missing, f"{fn.__qualname__}: parameters without a bad-input case: {missing}"
    assert set(table) <= parameters(fn) | set(SETTINGS) | extra


def test_every_setting_and_config_key_has_a_bad_input_case():
    settings = {f.name for f in fields(ClusterSettings)}
    assert set(SETTINGS) == settings, f"settings without a case: {settings - set(SETTINGS)}"
    keys = {config_key(k) for k in SETTINGS} | set(CLIENT_KEYS)
    assert keys == set(schema()), f"config keys without a case: {set(schema()) - keys}"


def test_every_cli_command_has_a_bad_input_case():
    from dask_amlcompute.cli.manage import COMMANDS

    assert {*COMMANDS, "demo", "env", "run"} <= set(CLI)


def test_the_table_is_at_least_the_fuzz_of_issue_26():
    assert len(CASES) + len(CLI_CASES) >= 162


# -- the cases ----------------------------------------------------------------------------------


class _Counter(BaseHTTPRequestHandler):
    requests: list[str] = []

    def _any(self) -> None:
        type(self).requests.append(f"{self.command} {self.path}")
        self.send_response(403)  # not transient: the library does not retry it
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_PUT = do_POST = do_PATCH = do_DELETE = _any

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def aml():
    """A loopback HTTP server standing in for AML: it counts every request (and refuses it)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Counter)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    yield url, make_ml_client(url, retry_total=0)
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture
def keep_signal_handlers():
    """The CLI entry point installs a SIGTERM handler: put ours back."""
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


def in_loop(fn: Any) -> Any:
    """Run ``fn`` inside a running event loop: an asynchronous cluster is then never started."""

    async def run() -> Any:
        return fn()

    return asyncio.run(run())


def attempt(case: Case, ml_client: Any, tmp_path: Path) -> None:
    """Call the entry point of ``case`` with its bad value; it must raise."""
    base: dict[str, Any] = {"compute": "c", "name": "fuzz", "quiet": True, "asynchronous": True}
    if case.entry in ("argument", "cluster"):
        in_loop(lambda: AmlComputeCluster(**{"ml_client": ml_client, **base, case.param: case.bad}))
    elif case.entry == "dask config":
        kwargs = {k: v for k, v in base.items() if config_key(k) != config_key(case.param)}
        with dask.config.set({f"amlcompute.{config_key(case.param)}": case.bad}):
            in_loop(lambda: AmlComputeCluster(ml_client, **kwargs))
    elif case.entry in ("scale", "adapt"):

        def call() -> None:
            cluster = AmlComputeCluster(ml_client, **base)
            getattr(cluster, case.entry)(**{case.param: case.bad})

        in_loop(call)
    elif case.entry == "map_batches":
        kwargs = {"fn": abs, "inputs": [1, 2], "progress": False, case.param: case.bad}
        if case.param == "output_dir" and case.bad == "UNWRITABLE":
            (tmp_path / "file").write_text("a file, not a folder")
            kwargs["output_dir"] = tmp_path / "file" / "out"
        map_batches(kwargs.pop("fn"), kwargs.pop("inputs"), **kwargs)
    elif case.entry == "submit_script":
        script = tmp_path / "job.py"
        script.write_text("print('hello')\n")
        kwargs = {"ml_client": ml_client, "script_path": script, "compute": "c", "wait": False}
        kwargs.update({"quiet": True, case.param: case.bad})
        submit_script(kwargs.pop("ml_client"), kwargs.pop("script_path"), **kwargs)
    elif case.entry == "from_name":
        kwargs: dict[str, Any] = {"name": "fuzz", "ml_client": ml_client}
        kwargs.update(case.bad if case.param == "kwargs" else {case.param: case.bad})
        AmlComputeCluster.from_name(**kwargs)
    else:
        raise AssertionError(case.entry)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_before_any_request(case, aml, tmp_path):
    _, ml_client = aml
    before = len(_Counter.requests)
    with pytest.raises(ConfigurationError) as info:
        attempt(case, ml_client, tmp_path)
    message = str(info.value)
    named = [*case.bad] if case.param == "kwargs" else [case.param, config_key(case.param)]
    assert any(name in message for name in named), message  # refused for this input
    assert _Counter.requests[before:] == [], "a request reached AML"


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_bad_command_line_is_one_line_and_exit_code_2(case, capsys, keep_signal_handlers):
    try:
        code = cli_main(case.bad)
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("dask-amlcompute")]) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_nodes": 10**9}, "n_nodes must be at most 4000"),
        ({"n_nodes": 4000, "processes_per_node": 1024}, "more than 100000"),
        ({"nodes_per_job": 4000, "processes_per_node": 1024}, "more than 100000"),
    ],
)
def test_huge_counts_fail_in_milliseconds_not_gigabytes(aml, kwargs, match):
    _, ml_client = aml
    started = time.perf_counter()
    with pytest.raises(ConfigurationError, match=match):
        AmlComputeCluster(ml_client, compute="c", asynchronous=True, **kwargs)
    assert time.perf_counter() - started < 0.5


def test_map_batches_takes_client_or_cluster_not_both():
    with pytest.raises(ConfigurationError, match="client= or cluster=, not both"):
        map_batches(abs, [1], client=object(), cluster=object(), progress=False)


def test_the_harness_lets_good_input_through(aml, tmp_path):
    """The same calls with good values pass validation: submit_script reaches the stand-in."""
    _, ml_client = aml
    cluster = in_loop(lambda: AmlComputeCluster(ml_client, compute="c", asynchronous=True))
    assert cluster.settings.compute == "c"
    script = tmp_path / "job.py"
    script.write_text("print('hello')\n")
    before = len(_Counter.requests)
    with pytest.raises(AmlComputeError) as info:
        submit_script(ml_client, script, compute="c", wait=False, quiet=True)
    # a refusal (403) is typed too, never the SDK's HttpResponseError
    assert isinstance(info.value, AccessDeniedError), info.value
    assert len(_Counter.requests) > before
