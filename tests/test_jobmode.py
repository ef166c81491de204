"""Job mode: a script and its Dask cluster as one AML job that ends with the script."""

from __future__ import annotations

import os
import shlex
import textwrap

import pytest

from dask_amlcompute.discovery import list_cluster_jobs
from dask_amlcompute.exceptions import ConfigurationError, JobFailedError
from dask_amlcompute.jobmode import (
    MAX_EMBEDDED_BYTES,
    OUTPUT_BEGIN,
    OUTPUT_END,
    SCRIPT_ENV,
    build_script_job,
    run_cli,
    script_output,
    submit_script,
)

OK_SCRIPT = """
import sys
from distributed import Client
from dask_amlcompute.batch import map_batches

client = Client()  # DASK_SCHEDULER_ADDRESS points at the job's scheduler
n = len(client.scheduler_info()["workers"])
total = sum(map_batches(lambda x: x * 2, range(1000), client=client, progress=False))
print(f"workers={n} total={total} args={sys.argv[1:]}")
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
                   experiment_name="exp", timeout_seconds=600)  # fmt: skip
    options.update(kwargs)
    return build_script_job(script, **options)


def test_embedded_script_job(tmp_path):
    job = _job(tmp_path, processes_per_node=2, script_args=["--alpha", "1 2"])
    argv = shlex.split(job.command)
    assert argv[:3] == ["python", "-m", "dask_amlcompute.node.script"]
    assert argv[argv.index("--processes") + 1] == "2"
    assert argv[argv.index("--") + 1 :] == ["--alpha", "1 2"]
    assert SCRIPT_ENV in job.environment_variables and job.code is None
    assert job.resources.instance_count == 3 and job.tags["dask_mode"] == "script"


def test_code_folder_job_does_not_embed(tmp_path):
    job = _job(tmp_path, code=str(tmp_path))
    argv = shlex.split(job.command)
    assert argv[argv.index("--script") + 1] == "job.py"
    assert SCRIPT_ENV not in job.environment_variables
    assert job.code == str(tmp_path)


def test_too_large_script_names_code_option(tmp_path):
    big = "".join(f"x{i} = {os.urandom(40).hex()!r}\n" for i in range(MAX_EMBEDDED_BYTES // 40))
    with pytest.raises(ConfigurationError, match="code="):
        _job(tmp_path, source=big)


def test_script_output_section():
    log = f"noise\n{OUTPUT_BEGIN}\nhello\nworld\n{OUTPUT_END} 0 -----\nmore noise"
    assert script_output(log) == "hello\nworld\n"
    assert script_output("no markers") is None


@pytest.mark.slow
def test_script_runs_to_completion(emulator, ml_client, tmp_path):
    script = tmp_path / "ok.py"
    script.write_text(textwrap.dedent(OK_SCRIPT))
    run = submit_script(ml_client, script, compute="cpu-cluster", n_nodes=2, job_timeout="5m",
                        script_args=["a", "b c"], poll_interval=0.3, quiet=True)  # fmt: skip
    assert run.status == "Completed" and run.exit_code == 0
    assert "workers=2 total=999000 args=['a', 'b c']" in run.output
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
    assert "ZeroDivisionError" in info.value.log_tail and "started" in info.value.log_tail
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
