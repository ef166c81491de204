"""Job mode: a script and its Dask cluster as one AML job that ends with the script."""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import dask
import pytest
from _helpers import wait_for

from dask_amlcompute._protocol import TLS_CERT_ENV, TLS_KEY_ENV, NodeOptions
from dask_amlcompute.cli.run import run_cli
from dask_amlcompute.discovery import list_cluster_jobs
from dask_amlcompute.exceptions import ConfigurationError, JobFailedError, TooManyNodesError
from dask_amlcompute.jobmode import (
    OUTPUT_BEGIN,
    OUTPUT_END,
    build_script_job,
    script_output,
    submit_script,
)

OK_SCRIPT = """
import os, sys
import dask_amlcompute
from distributed import Client
from dask_amlcompute.batch import map_batches

client = Client()  # DASK_SCHEDULER_ADDRESS points at the job's scheduler
n = len(client.scheduler_info()["workers"])
total = sum(map_batches(lambda x: x * 2, range(1000), client=client, progress=False))
print(f"workers={n} total={total} args={sys.argv[1:]}")
# the library comes from the job's code snapshot, the client's own packages are not there
print("library in snapshot:", dask_amlcompute.__file__.startswith(os.getcwd()))
try:
    import azure.ai.ml
    print("azure.ai.ml on the node: True")
except ImportError:
    print("azure.ai.ml on the node: False")
"""

FAILING_SCRIPT = """
from distributed import Client

client = Client()
print("started")
client.submit(lambda: 1 / 0).result()
"""


def _job(tmp_path, source="print('hi')\n", **kwargs):
    script = tmp_path / "job.py"
    script.write_text(source)
    options = dict(name="dask-run-test", compute="cpu-cluster", n_nodes=3, environment="env@latest",
                   experiment_name="exp", job_timeout=600)  # fmt: skip
    options.update(kwargs)
    return build_script_job(script, **options)


def test_lone_script_travels_in_the_code_snapshot(tmp_path):
    job = _job(tmp_path, processes_per_node=2, script_args=["--alpha", "1 2"])
    argv = shlex.split(job.command)
    assert argv[:3] == ["python", "-m", "dask_amlcompute.node.script"]
    opts = NodeOptions.from_argv(argv[3:], script=True)  # the parser the node uses
    assert opts.processes == 2 and opts.role == "cluster" and opts.name_prefix == "dask-run-test"
    assert opts.script.script == "job.py" and job.tags["dask_script"] == "job.py"
    assert job.display_name == "job.py on 3 node(s) (dask-amlcompute run)"
    assert opts.script.args == ("--alpha", "1 2")
    assert argv[argv.index("--") + 1 :] == ["--alpha", "1 2"]
    # the script and the library travel in the job's code snapshot, as for a cluster
    assert (Path(job.code) / "job.py").read_text() == "print('hi')\n"
    assert (Path(job.code) / "dask_amlcompute" / "node" / "script.py").is_file()
    assert job.resources.instance_count == 3 and job.tags["dask_mode"] == "script"
    with pytest.raises(ConfigurationError, match="Cannot read script_path"):
        build_script_job(tmp_path / "missing.py", compute="cpu-cluster")


def test_code_folder_job_runs_the_script_from_it(tmp_path):
    (tmp_path / "helper.py").write_text("X = 1\n")
    job = _job(tmp_path, code=str(tmp_path))
    argv = shlex.split(job.command)
    assert NodeOptions.from_argv(argv[3:], script=True).script.script == "job.py"
    # one snapshot: the user's folder at the top, the library beside it
    assert (Path(job.code) / "job.py").read_text() == "print('hi')\n"
    assert (Path(job.code) / "helper.py").is_file()
    assert (Path(job.code) / "dask_amlcompute" / "node" / "script.py").is_file()


def test_script_output_section():
    log = f"noise\n{OUTPUT_BEGIN}\nhello\nworld\n{OUTPUT_END} 0 -----\nmore noise"
    assert script_output(log) == "hello\nworld\n"
    assert script_output("no markers") is None


def _body(job):
    return job._to_job()._to_rest_object().as_dict()["properties"]


def test_job_mode_reads_dask_config_like_the_cluster(tmp_path):
    script = tmp_path / "job.py"
    script.write_text("print('hi')\n")
    config = {
        "amlcompute.job-timeout": "15m",
        "amlcompute.experiment-name": "from-config",
        "amlcompute.env-vars": {"FROM_CONFIG": "1"},
        "amlcompute.distribution": "mpi",
        "amlcompute.processes-per-node": 3,
        "amlcompute.threads-per-process": 2,
        "amlcompute.pip-packages": ["tabulate"],
        "amlcompute.conda-packages": ["gcc"],
        "amlcompute.node-package": "git+https://example.org/dask-amlcompute.git",
    }
    with dask.config.set(config):
        job = build_script_job(script, name="cfg-run", compute="cpu-cluster", n_nodes=2)
        body = _body(job)
        assert body["limits"]["timeout"] == "PT15M"
        assert body["experimentName"] == "from-config"
        assert body["distribution"]["distributionType"] == "Mpi"
        assert body["environmentVariables"]["FROM_CONFIG"] == "1"
        opts = NodeOptions.from_argv(shlex.split(job.command)[3:], script=True)
        assert (opts.processes, opts.threads) == (3, 2)
        deps = job.environment.conda_file["dependencies"]
        pip = next(d["pip"] for d in deps if isinstance(d, dict))
        assert "tabulate" in pip and "gcc" in deps
        assert "git+https://example.org/dask-amlcompute.git" in pip

        # an argument wins over dask config (a mapping replaces the configured one)
        job = build_script_job(
            script, name="arg-run", compute="cpu-cluster", job_timeout="5m",
            experiment_name="from-arg", env_vars={"FROM_ARG": "1"}, distribution="pytorch",
            processes_per_node=1, threads_per_process=4, pip_packages=["rich"], conda_packages=[],
        )  # fmt: skip
        body = _body(job)
        assert body["limits"]["timeout"] == "PT5M" and body["experimentName"] == "from-arg"
        assert body["distribution"]["distributionType"] == "PyTorch"
        assert "FROM_CONFIG" not in body["environmentVariables"]
        assert body["environmentVariables"]["FROM_ARG"] == "1"
        opts = NodeOptions.from_argv(shlex.split(job.command)[3:], script=True)
        assert (opts.processes, opts.threads) == (1, 4)
        deps = job.environment.conda_file["dependencies"]
        pip = next(d["pip"] for d in deps if isinstance(d, dict))
        assert "rich" in pip and "tabulate" not in pip and "gcc" not in deps

    # configured packages with a configured user environment: refused, as for a cluster
    with dask.config.set({"amlcompute.environment": "my-env@latest"}):
        assert _body(_job(tmp_path, environment=None))["environmentId"] == "my-env@latest"
        with (
            dask.config.set({"amlcompute.pip-packages": ["tabulate"]}),
            pytest.raises(ConfigurationError, match="pip_packages"),
        ):
            _job(tmp_path, environment=None)
    with (
        dask.config.set({"amlcompute.distribution": "horovod"}),
        pytest.raises(ConfigurationError, match="distribution"),
    ):
        _job(tmp_path)
    # without config: the package defaults (amlcompute.yaml)
    assert _body(_job(tmp_path, job_timeout=None))["limits"]["timeout"] == "PT2H"


def test_script_job_security_and_timeouts_reach_the_node_command(tmp_path):
    job = _job(tmp_path, security=True, idle_timeout="2m", no_client_timeout=30, wait_workers=60)
    env = job.environment_variables
    assert "BEGIN CERTIFICATE" in env[TLS_CERT_ENV] and "PRIVATE KEY" in env[TLS_KEY_ENV]
    opts = NodeOptions.from_argv(shlex.split(job.command)[3:], script=True)
    assert (opts.idle_timeout, opts.no_client_timeout) == (120, 30)
    # the script's client only connects once the workers are in: the first contact may be late
    assert opts.first_contact_timeout == 90
    plain = _job(tmp_path)
    assert TLS_CERT_ENV not in plain.environment_variables
    opts = NodeOptions.from_argv(shlex.split(plain.command)[3:], script=True)
    assert opts.idle_timeout is None and opts.no_client_timeout is None


def test_script_job_takes_the_clusters_node_settings(tmp_path):
    # what a cluster's nodes honour reaches a script job's nodes too
    settings = dict(memory_limit="2GiB", scheduler_port=9786, dashboard_port=9787,
                    worker_on_scheduler=False, scheduler_options={"allowed_failures": 5},
                    worker_options={"resources": {"DISK": 1}})  # fmt: skip
    opts = NodeOptions.from_argv(shlex.split(_job(tmp_path, **settings).command)[3:], script=True)
    assert (opts.memory_limit, opts.scheduler_port, opts.dashboard_port) == ("2GiB", 9786, 9787)
    assert opts.worker_on_scheduler is False and opts.job_timeout == 600
    assert opts.scheduler_options == {"allowed_failures": 5}
    assert opts.worker_options == {"resources": {"DISK": 1}}


def test_script_job_gets_the_clusters_checks_before_submission(emulator, ml_client, tmp_path):
    # the cluster's plan (plan_cluster) refuses what can never run: nothing is submitted
    script = tmp_path / "job.py"
    script.write_text("print('hi')\n")
    with pytest.raises(TooManyNodesError, match="at most 2"):
        submit_script(ml_client, script, compute="tiny", n_nodes=3, name="run-too-many", quiet=True)
    with pytest.raises(Exception):  # noqa: B017  the job was never created
        ml_client.jobs.get("run-too-many")


@pytest.mark.slow
def test_script_runs_to_completion(emulator, ml_client, tmp_path):
    script = tmp_path / "ok.py"
    script.write_text(textwrap.dedent(OK_SCRIPT))
    run = submit_script(ml_client, script, compute="cpu-cluster", n_nodes=2, job_timeout="5m",
                        script_args=["a", "b c"], poll_interval=0.3, quiet=True)  # fmt: skip
    assert run.status == "Completed" and run.exit_code == 0
    assert "workers=2 total=999000 args=['a', 'b c']" in run.output
    assert "library in snapshot: True" in run.output
    assert "azure.ai.ml on the node: False" in run.output
    assert emulator.job_status(run.job_name) == "Completed"
    assert run.job_name not in emulator.active_jobs()
    listed = [j for j in list_cluster_jobs(ml_client, include_ended=True) if j.name == run.job_name]
    assert [j.kind for j in listed] == ["script"]  # `dask-amlcompute list` says so


@pytest.mark.slow
def test_failing_script_fails_the_job_with_its_error(run_tags_withheld, ml_client, tmp_path):
    # the exit code tag is only in run history here: the client must read it there
    emulator = run_tags_withheld
    script = tmp_path / "bad.py"
    script.write_text(textwrap.dedent(FAILING_SCRIPT))
    with pytest.raises(JobFailedError, match="exited with code 1") as info:
        submit_script(ml_client, script, compute="cpu-cluster", n_nodes=2, job_timeout="5m",
                      poll_interval=0.3, quiet=True)  # fmt: skip
    assert info.value.exit_code == 1 and info.value.status == "Failed"
    assert "ZeroDivisionError" in info.value.log_tail  # the error's tail ends with the traceback
    # a line from the script's start: read the full log (load can push it out of a tail)
    assert "started" in emulator.node_log(info.value.job_name, 0)
    assert emulator.job_status(info.value.job_name) == "Failed"


@pytest.mark.slow
def test_cli_with_own_emulator(tmp_path, capsys, monkeypatch):
    script = tmp_path / "exit3.py"
    script.write_text("import sys\nprint('bye')\nsys.exit(3)\n")
    monkeypatch.chdir(tmp_path)
    assert run_cli([str(script), "--nodes", "1", "--emulator", "--quiet"]) == 3
    err = capsys.readouterr().err
    assert "exited with code 3" in err and "bye" in err
    assert run_cli([str(script), "--nodes", "1"]) == 2  # no --compute, no --emulator


TLS_SCRIPT = """
from distributed import Client

client = Client()
workers = list(client.scheduler_info()["workers"])
print(f"scheduler={client.scheduler.address} workers={workers}")
assert client.scheduler.address.startswith("tls://")
assert workers and all(w.startswith("tls://") for w in workers)
print("total", sum(client.gather(client.map(lambda x: x + 1, range(10)))))
"""


@pytest.mark.slow
def test_tls_reaches_the_script_scheduler(emulator, ml_client, tmp_path):
    # job mode starts its scheduler like a cluster's: with the job's TLS certificate
    script = tmp_path / "tls.py"
    script.write_text(textwrap.dedent(TLS_SCRIPT))
    run = submit_script(ml_client, script, compute="cpu-cluster", n_nodes=2, job_timeout="5m",
                        security=True, wait_timeout=120, poll_interval=0.3, quiet=True)  # fmt: skip
    assert run.status == "Completed" and run.exit_code == 0, run.output
    assert "scheduler=tls://" in run.output and "total 55" in run.output


@pytest.mark.slow
def test_idle_timeout_ends_a_hung_script_job(emulator, ml_client, tmp_path):
    # the scheduler's idle timeout applies to script jobs: a script that hangs without
    # work ends its job long before job_timeout (the clock starts with the scheduler, so it
    # must leave the script time to start Python and connect in its own environment)
    script = tmp_path / "hang.py"
    script.write_text("import time\nfrom distributed import Client\n"
                      "client = Client()\nprint('connected', flush=True)\ntime.sleep(600)\n")  # fmt: skip
    with pytest.raises(JobFailedError) as info:
        submit_script(ml_client, script, compute="cpu-cluster", n_nodes=1, job_timeout="10m",
                      idle_timeout=10, wait_timeout=90, poll_interval=0.3, quiet=True)  # fmt: skip
    assert info.value.status == "Failed" and info.value.exit_code == 128 + signal.SIGTERM
    assert info.value.log_tail  # the error carries the log's tail; the line is in the full log
    assert "connected" in emulator.node_log(info.value.job_name, 0)


@pytest.mark.slow
def test_submit_script_works_inside_a_running_event_loop(emulator, ml_client, tmp_path):
    # a notebook: the kernel's event loop runs in the calling thread
    script = tmp_path / "hello.py"
    script.write_text("print('hello from the job')\n")

    async def notebook_cell():
        return submit_script(ml_client, script, compute="cpu-cluster", n_nodes=1,
                             job_timeout="5m", poll_interval=0.3, quiet=True)  # fmt: skip

    run = asyncio.run(notebook_cell())
    assert run.status == "Completed" and "hello from the job" in run.output


# A user's Ctrl-C in a terminal: SIGINT has its default handler there. A harness that runs
# the suite in the background (a non-interactive shell's `cmd &`) starts every process with
# SIGINT ignored, and children inherit that, so the client below restores the default first.
INTERRUPTED_CLIENT = """
import signal
import sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from aml_emulator import make_ml_client
from dask_amlcompute.jobmode import submit_script

ml = make_ml_client(sys.argv[1])
try:
    submit_script(ml, sys.argv[2], compute="cpu-cluster", n_nodes=1, name=sys.argv[3],
                  job_timeout="10m", poll_interval=0.2)
except KeyboardInterrupt:
    print("KeyboardInterrupt", flush=True)
    sys.exit(130)
print("not interrupted", flush=True)
"""


@pytest.mark.slow
def test_ctrl_c_cancels_the_script_job(emulator, tmp_path):
    script = tmp_path / "long.py"
    script.write_text("import time\ntime.sleep(600)\n")
    name = "dask-run-interrupted-" + os.urandom(3).hex()
    proc = subprocess.Popen(
        [sys.executable, "-c", INTERRUPTED_CLIENT, emulator.base_url, str(script), name],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: name in emulator.active_jobs() and emulator.job_status(name) == "Running",
                 timeout=60, what="job running", interval=0.2)  # fmt: skip
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err[-3000:]
    assert "KeyboardInterrupt" in out and f"cancelling AML job {name}" in err
    # cancelled before submit_script returned: nothing keeps running
    assert emulator.wait_job(name, timeout=30) == "Canceled"


def test_run_command_help_exits_cleanly(capsys):
    from dask_amlcompute.cli import main as cli_main

    assert cli_main(["run", "--help"]) == 0
    assert "--nodes" in capsys.readouterr().out
