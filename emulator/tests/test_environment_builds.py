"""The emulator builds environments as AML builds images: one cached, isolated venv each.

Everything goes through the unmodified SDK (``emu.ml_client()``, ``command(...)``,
``Environment(image=..., conda_file={...})``). Builds install from the package index
(PyPI) with uv; the build cache is a temporary folder of this test session, never the
user's cache. Every wait is bounded; the emulators only listen on loopback.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
import uuid

import pytest
import requests
from _emu_helpers import PRINT_ENV, node_env, wait_for

from aml_emulator import identity
from aml_emulator.envbuild import BUILD_FAILED_MESSAGE, BUILD_LOG_NAME
from aml_emulator.reaper import group_running

pytestmark = pytest.mark.slow

PY = "{}.{}".format(*sys.version_info[:2])
#: A missing requirement: no package index has it.
MISSING = "dask-amlcompute-no-such-package-xyz==0.0.1"
#: Prints the node's interpreter, sys.path and whether six / azure.ai.ml import.
PROBE = (
    'python -c "import json, sys, six; '
    "print('PROBE' + json.dumps({'exe': sys.executable, 'path': sys.path, 'six': six.__version__}))\""
    ' && (python -c "import azure.ai.ml" 2>/dev/null && echo AZURE=importable'
    " || echo AZURE=missing)"
)


def conda(*pip: str, python: str = PY, tag: str | None = None) -> dict:
    """A conda file; ``tag`` (its ``name``) makes the content, hence the build, unique."""
    return {
        "name": tag or "emulator-build-test",
        "channels": ["conda-forge"],
        "dependencies": [f"python={python}", "pip", {"pip": list(pip)}],
    }


def submit(ml, cmd: str, environment) -> str:
    from azure.ai.ml import command

    job = command(
        command=cmd, compute="cpu-cluster", environment=environment, experiment_name="builds"
    )
    return ml.jobs.create_or_update(job).name


def environment(conda_file: dict | None = None, image: str = "python:3.11-slim"):
    from azure.ai.ml.entities import Environment

    return Environment(image=image, conda_file=conda_file)


def probe(emu, job: str) -> dict:
    for line in emu.node_log(job, 0).splitlines():
        if line.startswith("PROBE"):
            return json.loads(line[len("PROBE") :])
    raise AssertionError(f"no PROBE line in the log of {job}:\n{emu.node_log(job, 0)}")


def build_pids(emu) -> set[int]:
    """Installer process groups the emulator's builder runs right now."""
    return emu._call(lambda e: set(e.builder.running) if e.builder else set())


def watch_preparing(emu, job: str, timeout: float = 300.0) -> tuple[set[str], set[int]]:
    """Poll until the job ends: the statuses seen, and build processes seen while Preparing."""
    seen: set[str] = set()
    pids: set[int] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        nodes = emu.job_nodes(job)  # nodes first: a node seen started must mean Running after
        status = emu.job_status(job)
        seen.add(status)
        if status == "Preparing":
            pids |= build_pids(emu)
            assert all(n["pid"] is None for n in nodes), "a node started early"
        if status in ("Completed", "Failed", "Canceled"):
            return seen, pids
        time.sleep(0.01)
    raise AssertionError(f"{job} did not finish within {timeout}s ({emu.job_status(job)})")


def run_details(emu, job: str) -> dict:
    url = (
        f"{emu.base_url}/history/v1.0/subscriptions/{identity.SUBSCRIPTION_ID}/resourceGroups/"
        f"{identity.RESOURCE_GROUP}/providers/Microsoft.MachineLearningServices/workspaces/"
        f"{identity.WORKSPACE_NAME}/runs/{job}/details"
    )
    answer = requests.get(url, timeout=10)
    answer.raise_for_status()
    return answer.json()


@pytest.fixture(scope="module")
def env_cache(tmp_path_factory) -> str:
    """The build cache of this session (never ``~/.cache``)."""
    return str(tmp_path_factory.mktemp("emulator-envs"))


@pytest.fixture(scope="module")
def bemu(env_cache):
    """An emulator that builds environments (the default) into the session's cache."""
    from aml_emulator import ComputeSpec, Emulator

    computes = [ComputeSpec(name="cpu-cluster", max_nodes=4, ssh_public_access=False)]
    with Emulator(computes=computes, environment_cache=env_cache, build_timeout=600) as emulator:
        yield emulator


@pytest.fixture(scope="module")
def bml(bemu):
    return bemu.ml_client()


@pytest.fixture(scope="module")
def six_env():
    """An environment with this Python and six, unique to the session (a first build)."""
    return environment(conda("six==1.16.0", tag=f"six-{uuid.uuid4().hex[:8]}"))


def test_build_runs_the_node_in_an_isolated_venv(bemu, bml, six_env, env_cache):
    job = submit(bml, PROBE, six_env)
    seen, pids = watch_preparing(bemu, job)
    assert bemu.job_status(job) == "Completed", (bemu.job_error(job), bemu.node_log(job, 0))
    # The job waited in Preparing while the installer ran, and no node ran before it ended.
    assert "Preparing" in seen and pids, seen
    assert not any(group_running(p) for p in pids)
    log = bemu.node_log(job, 0)
    assert log.startswith("[emulator] building environment "), log
    assert "[emulator] built environment " in log
    found = probe(bemu, job)
    assert found["six"] == "1.16.0"
    assert found["exe"].startswith(env_cache), found["exe"]
    # No path of the client's virtualenv (its site-packages) is visible on the node.
    client = os.path.realpath(sys.prefix)
    assert not [p for p in found["path"] if p and os.path.realpath(p).startswith(client)], found
    assert "AZURE=missing" in log  # azure-ai-ml is the client's, not the environment's
    env = node_env_of(bemu, bml, six_env)
    assert env["env"]["VIRTUAL_ENV"] == os.path.dirname(os.path.dirname(found["exe"]))
    assert env["env"]["PYTHONNOUSERSITE"] == "1"
    assert "PYTHONPATH" not in env["env"] and "PYTHONHOME" not in env["env"]
    assert env["env"]["PATH"].split(os.pathsep)[0] == os.path.dirname(found["exe"])
    # The image build log is served over HTTP, listed in the run details' logFiles.
    details = run_details(bemu, job)
    text = requests.get(details["logFiles"][BUILD_LOG_NAME], timeout=10).text
    assert "six==1.16.0" in text and "built environment" in text


def node_env_of(emu, ml, env) -> dict:
    """Run PRINT_ENV in ``env`` (already built: reused) and return what it printed."""
    job = submit(ml, PRINT_ENV, env)
    assert emu.wait_job(job, 120) == "Completed", emu.node_log(job, 0)
    return node_env(emu, job, 0)


def test_same_environment_reuses_the_cached_build(bemu, bml, six_env):
    started = time.monotonic()
    job = submit(bml, PROBE, six_env)
    assert bemu.wait_job(job, 120) == "Completed", bemu.node_log(job, 0)
    assert time.monotonic() - started < 30
    log = bemu.node_log(job, 0)
    assert "[emulator] reused cached build of environment " in log, log
    assert probe(bemu, job)["six"] == "1.16.0"


def test_jobs_needing_one_environment_share_one_build(bemu, bml):
    env = environment(conda("six==1.16.0", tag=f"shared-{uuid.uuid4().hex[:8]}"))
    jobs = [submit(bml, "python -c 'import six'", env) for _ in range(2)]
    for job in jobs:
        assert bemu.wait_job(job, 300) == "Completed", bemu.node_log(job, 0)
    # Both waited for the same build task: each says "built", neither "reused".
    for job in jobs:
        assert "[emulator] built environment " in bemu.node_log(job, 0), bemu.node_log(job, 0)


def test_uninstallable_requirement_fails_like_an_image_build(bemu, bml):
    env = environment(conda(MISSING, tag=f"broken-{uuid.uuid4().hex[:8]}"))
    job = submit(bml, "echo never", env)
    assert bemu.wait_job(job, 300) == "Failed"
    error = bemu.job_error(job)
    assert error["code"] == "UserError"
    assert error["message"] == BUILD_FAILED_MESSAGE
    assert error["message"] == (
        "Image build failed. For more details, check log file azureml-logs/20_image_build_log.txt."
    )
    assert error["innerError"] == {"code": "BadArgument"}
    # The SDK sees the same error.
    assert bml.jobs.get(job).status == "Failed"
    # The build log, listed in the run details and served over HTTP, names the requirement.
    details = run_details(bemu, job)
    assert details["error"]["error"]["message"] == BUILD_FAILED_MESSAGE
    text = requests.get(details["logFiles"][BUILD_LOG_NAME], timeout=10).text
    assert MISSING.split("==")[0] in text
    assert "not found in the package registry" in text or "No matching distribution" in text
    # Nothing is left running: no node ever started, no installer is alive.
    assert job not in bemu.active_jobs()
    assert all(n["pid"] is None for n in bemu.job_nodes(job))
    assert not build_pids(bemu)
    assert "echo never" not in bemu.node_log(job, 0)


def test_missing_python_fails_the_build_naming_it(bemu, bml):
    env = environment(conda("six==1.16.0", python="3.4", tag=f"py34-{uuid.uuid4().hex[:8]}"))
    job = submit(bml, "echo never", env)
    assert bemu.wait_job(job, 60) == "Failed"
    assert bemu.job_error(job)["message"] == BUILD_FAILED_MESSAGE
    text = requests.get(run_details(bemu, job)["logFiles"][BUILD_LOG_NAME], timeout=10).text
    assert "Python 3.4 is not available" in text and "python3.4" in text


@pytest.fixture
def slow_package(tmp_path):
    """A local project whose wheel build sleeps (and records its PID): a build that hangs."""
    root = tmp_path / "slowpkg"
    root.mkdir()
    (root / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [build-system]
            requires = []
            build-backend = "slow_backend"
            backend-path = ["."]

            [project]
            name = "slowpkg"
            version = "0.0.1"
            """
        )
    )
    (root / "slow_backend.py").write_text(
        textwrap.dedent(
            f"""
            import os, time

            def _hang(*args, **kwargs):
                with open({str(root / "pids")!r}, "a") as fh:
                    fh.write(f"{{os.getpid()}}\\n")
                time.sleep(120)
                raise RuntimeError("not reached")

            build_wheel = build_editable = prepare_metadata_for_build_wheel = _hang
            get_requires_for_build_wheel = lambda *a, **k: []
            """
        )
    )
    return root


def test_cancel_during_build_stops_the_build(bemu, bml, slow_package):
    env = environment(conda(f"slowpkg @ {slow_package.as_uri()}", tag=uuid.uuid4().hex[:8]))
    job = submit(bml, "echo never", env)
    pids_file = slow_package / "pids"
    wait_for(lambda: pids_file.exists() and pids_file.read_text().strip(), 120, "the slow build")
    assert bemu.job_status(job) == "Preparing"
    groups = build_pids(bemu)
    assert groups
    hanging = [int(p) for p in pids_file.read_text().split()]
    bml.jobs.begin_cancel(job).result(timeout=60)
    assert bemu.wait_job(job, 60) == "Canceled"
    # The installer's process group (and the backend it ran) is gone.
    assert not build_pids(bemu)
    assert not any(group_running(g) for g in groups)
    wait_for(lambda: not any(_alive(p) for p in hanging), 10, "the hanging backend to exit")
    assert all(n["pid"] is None for n in bemu.job_nodes(job))
    assert job not in bemu.active_jobs()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_image_only_environment_runs_on_the_stand_in(bemu, bml):
    job = submit(bml, PRINT_ENV, environment(None, image="python:3.11-slim"))
    assert bemu.wait_job(job, 60) == "Completed", bemu.node_log(job, 0)
    assert node_env(bemu, job, 0)["exe"] == sys.executable
    log = bemu.node_log(job, 0)
    assert "[emulator] environment has no conda file" in log
    assert "building environment" not in log
    assert BUILD_LOG_NAME not in run_details(bemu, job)["logFiles"]


def test_fast_mode_runs_conda_environments_on_the_shared_interpreter(tmp_path):
    from aml_emulator import ComputeSpec, Emulator

    cache = tmp_path / "envs"
    with Emulator(
        computes=[ComputeSpec(name="cpu-cluster", ssh_public_access=False)],
        build_environments=False,
        environment_cache=str(cache),
    ) as emu:
        ml = emu.ml_client()
        env = environment(conda(MISSING, tag=uuid.uuid4().hex[:8]))
        job = submit(ml, PRINT_ENV, env)
        assert emu.wait_job(job, 60) == "Completed", emu.node_log(job, 0)
        assert node_env(emu, job, 0)["exe"] == sys.executable
        assert "environment builds are off" in emu.node_log(job, 0)
    assert not cache.exists()


def test_fast_mode_settings():
    from aml_emulator.cli import _make_emulator, build_parser
    from aml_emulator.config import EmulatorConfig, config_from_dict

    assert EmulatorConfig().build_environments is True
    assert config_from_dict({"build_environments": False}).build_environments is False
    emu = _make_emulator(build_parser().parse_args(["--no-build"]))
    assert emu.config.build_environments is False
    assert _make_emulator(build_parser().parse_args([])).config.build_environments is True
