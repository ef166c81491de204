"""``command(code=folder)`` through the unmodified SDK: upload, reuse by hash, per-node copies.

The SDK lists code versions by content hash, asks for a pending upload (container SAS),
uploads the folder with azure-storage-blob to the workspace storage (Azurite), registers
the code version and PUTs the job with its ``codeId``.  Each node then runs in its own
copy of the snapshot.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import random
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import pytest
import requests
from azure.ai.ml import command
from azure.core.exceptions import HttpResponseError

from aml_emulator import ComputeSpec, Emulator, EnvironmentSpec, identity

ENV = "azureml:snap-env:1"
API = "api-version=2023-04-01"
START = "POST CodeStartPendingUploadHandler"


@pytest.fixture(scope="module")
def snap_emu():
    """An emulator of its own (request counts start at zero), image-only environment."""
    with Emulator(
        computes=[ComputeSpec(name="cpu-cluster", max_nodes=4, ssh_public_access=False)],
        environments=[EnvironmentSpec(name="snap-env", version="1", image="python:3.11")],
    ) as emu:
        yield emu


@pytest.fixture(scope="module")
def snap_ml(snap_emu):
    return snap_emu.ml_client()


def _counts(emu: Emulator) -> dict[str, int]:
    return requests.get(emu.base_url + "/emulator/status", timeout=10).json()["requests"]


def _delta(before: dict[str, int], after: dict[str, int], key: str) -> int:
    return after.get(key, 0) - before.get(key, 0)


def _write(root: Any, files: dict[str, bytes | str]) -> str:
    for rel, content in files.items():
        path = os.path.join(root, *rel.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        mode = "wb" if isinstance(content, bytes) else "w"
        with open(path, mode) as fh:
            fh.write(content)
    return str(root)


def _submit(ml: Any, code: str, cmd: str, nodes: int = 1, **kw: Any) -> Any:
    job = command(
        code=code,
        command=cmd,
        compute="cpu-cluster",
        environment=ENV,
        instance_count=nodes,
        experiment_name="code-snapshots",
        **kw,
    )
    return ml.jobs.create_or_update(job)


def _pending_upload(emu: Emulator) -> dict[str, Any]:
    """Ask for a pending upload over plain HTTP (what the SDK's REST client sends)."""
    url = (
        f"{emu.base_url}{identity.child_id('codes', 'direct', 'versions', '1')}"
        f"/startPendingUpload?{API}"
    )
    answer = requests.post(url, json={"pendingUploadType": "TemporaryBlobReference"}, timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()["blobReferenceForConsumption"]


def _with_query(url: str, query: dict[str, str]) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))


# ----------------------------------------------------------------------------- (a)
@pytest.mark.slow
def test_snapshot_is_the_working_directory_of_every_node(snap_emu, snap_ml, tmp_path):
    src = _write(
        tmp_path / "src",
        {
            "helper.py": "VALUE = 'from-helper-a'\n",
            "main.py": (
                "import json, os, helper\n"
                "files = sorted(os.path.relpath(os.path.join(d, f), '.')\n"
                "               for d, _, fs in os.walk('.') for f in fs\n"
                "               if '__pycache__' not in d)\n"
                "print('SNAP ' + json.dumps({'value': helper.VALUE, 'files': files,\n"
                "      'data': open('sub/data.txt').read(), 'cwd': os.getcwd()}))\n"
            ),
            "sub/data.txt": "nested file a\n",
            "sub/deeper/more.txt": "deep\n",
        },
    )
    job = _submit(snap_ml, src, "python main.py", nodes=2, distribution={"type": "pytorch"})
    assert job.code and "/codes/" in job.code and job.code.endswith("/versions/1")
    assert snap_emu.wait_job(job.name, 30) == "Completed", snap_emu.job_error(job.name)
    nodes = snap_emu.job_nodes(job.name)
    seen = []
    for rank in range(2):
        line = next(
            ln for ln in snap_emu.node_log(job.name, rank).splitlines() if ln.startswith("SNAP ")
        )
        out = json.loads(line[5:])
        assert out["value"] == "from-helper-a"
        assert out["data"] == "nested file a\n"
        assert out["files"] == ["helper.py", "main.py", "sub/data.txt", "sub/deeper/more.txt"]
        assert os.path.samefile(out["cwd"], nodes[rank]["workdir"])
        seen.append(out["cwd"])
    # AML nodes are separate machines: each node has its own copy, not a shared one.
    assert seen[0] != seen[1]
    a, b = (os.path.join(n["workdir"], "helper.py") for n in nodes)
    assert not os.path.samefile(a, b)
    # The job resource keeps the code reference.
    got = snap_ml.jobs.get(job.name)
    assert got.code == job.code


# ----------------------------------------------------------------------------- (b)
@pytest.mark.slow
def test_same_content_is_uploaded_once_changed_content_again(snap_emu, snap_ml, tmp_path):
    files = {"run.py": "print('RUN', open('conf.txt').read().strip())\n", "conf.txt": "one\n"}
    first_dir = _write(tmp_path / "first" / "proj", files)
    before = _counts(snap_emu)
    job1 = _submit(snap_ml, first_dir, "python run.py")
    after1 = _counts(snap_emu)
    assert _delta(before, after1, START) == 1
    assert _delta(before, after1, "PUT CodeVersionHandler") == 1

    # Same content in another folder: the SDK finds the snapshot by hash, uploads nothing.
    again_dir = _write(tmp_path / "again" / "other-name", files)
    job2 = _submit(snap_ml, again_dir, "python run.py")
    after2 = _counts(snap_emu)
    assert _delta(after1, after2, START) == 0  # no pending upload: nothing to upload to
    assert _delta(after1, after2, "PUT CodeVersionHandler") == 0
    assert _delta(after1, after2, "GET CodeVersionHandler") == 1  # reads the found version
    assert job2.code == job1.code

    # One changed byte: a new hash, a new upload, a new code version.
    changed_dir = _write(tmp_path / "changed" / "proj", {**files, "conf.txt": "two\n"})
    job3 = _submit(snap_ml, changed_dir, "python run.py")
    after3 = _counts(snap_emu)
    assert _delta(after2, after3, START) == 1
    assert job3.code != job1.code

    for job, word in ((job1, "one"), (job2, "one"), (job3, "two")):
        assert snap_emu.wait_job(job.name, 30) == "Completed", snap_emu.job_error(job.name)
        assert f"RUN {word}" in snap_emu.node_log(job.name, 0)


# ----------------------------------------------------------------------------- (c)
def test_job_with_unknown_code_id_is_refused(snap_emu, snap_ml):
    missing = identity.child_id("codes", "no-such-code", "versions", "7")
    before = _counts(snap_emu)
    with pytest.raises(HttpResponseError) as info:
        _submit(snap_ml, missing, "python -c 'print(1)'", name="job-missing-code")
    assert info.value.status_code == 404
    assert "no-such-code:7" in str(info.value)
    assert _delta(before, _counts(snap_emu), "PUT JobHandler") == 1
    status = requests.get(snap_emu.base_url + "/emulator/status", timeout=10).json()
    assert "job-missing-code" not in status["jobs"]


def test_code_version_must_point_at_uploaded_blobs(snap_emu):
    ref = _pending_upload(snap_emu)
    url = f"{snap_emu.base_url}{identity.child_id('codes', 'empty', 'versions', '1')}?{API}"
    body = {"properties": {"codeUri": ref["blobUri"] + "/nothing-here", "isAnonymous": True}}
    answer = requests.put(url, json=body, timeout=10)
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "UserError"
    elsewhere = {"properties": {"codeUri": "https://example.com/blob/acct/ctr/x"}}
    assert requests.put(url, json=elsewhere, timeout=10).status_code == 400


# ----------------------------------------------------------------------------- (e)
@pytest.mark.slow
def test_large_folder_round_trips_byte_identical(snap_emu, snap_ml, tmp_path):
    rng = random.Random(1234)
    files: dict[str, bytes | str] = {
        "big.bin": rng.randbytes(3 * 1024 * 1024),
        "data/part-0.bin": rng.randbytes(700 * 1024),
        "data/part-1.bin": rng.randbytes(900 * 1024 + 17),
        "data/nested/empty.txt": b"",
        "data/nested/notes.txt": "unicode: \u00e9\u00e8\u4e2d\n" * 200,
        "manifest.py": (
            "import hashlib, json, os\n"
            "out = {}\n"
            "for d, _, fs in os.walk('.'):\n"
            "    for f in fs:\n"
            "        p = os.path.relpath(os.path.join(d, f), '.')\n"
            "        out[p] = hashlib.sha256(open(p, 'rb').read()).hexdigest()\n"
            "print('MANIFEST ' + json.dumps(out, sort_keys=True))\n"
        ),
    }
    src = _write(tmp_path / "bigproj", files)
    expected = {
        rel: hashlib.sha256(
            content if isinstance(content, bytes) else content.encode("utf-8")
        ).hexdigest()
        for rel, content in files.items()
    }
    job = _submit(snap_ml, src, "python manifest.py", nodes=2)
    assert snap_emu.wait_job(job.name, 60) == "Completed", snap_emu.job_error(job.name)
    for node in snap_emu.job_nodes(job.name):
        line = next(
            ln
            for ln in snap_emu.node_log(job.name, node["rank"]).splitlines()
            if ln.startswith("MANIFEST ")
        )
        assert json.loads(line[len("MANIFEST ") :]) == expected
        cmp = filecmp.dircmp(src, node["workdir"])
        assert not cmp.left_only and not cmp.right_only and not cmp.diff_files
        for rel in files:
            assert filecmp.cmp(
                os.path.join(src, rel), os.path.join(node["workdir"], rel), shallow=False
            )


def test_https_emulator_uploads_with_trusted_certificate(tmp_path, monkeypatch):
    """With ``https=True`` the SDK verifies the emulator certificate through
    ``REQUESTS_CA_BUNDLE`` and uploads the snapshot to the workspace storage."""
    src = _write(tmp_path / "tls", {"t.py": "print('TLS-OK')\n"})
    with Emulator(
        computes=[ComputeSpec(name="cpu-cluster", max_nodes=1, ssh_public_access=False)],
        environments=[EnvironmentSpec(name="snap-env", version="1", image="python:3.11")],
        https=True,
    ) as emu:
        assert emu.cert_path
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", emu.cert_path)
        ml = emu.ml_client()
        job = _submit(ml, src, "python t.py")
        assert emu.wait_job(job.name, 30) == "Completed", emu.job_error(job.name)
        assert "TLS-OK" in emu.node_log(job.name, 0)


def test_without_azurite_an_upload_is_refused_saying_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv("AZURITE_BIN", str(tmp_path / "no-azurite-here"))
    with Emulator(computes=[ComputeSpec(name="cpu-cluster", max_nodes=1)]) as emu:
        url = (
            f"{emu.base_url}{identity.child_id('codes', 'x', 'versions', '1')}"
            f"/startPendingUpload?{API}"
        )
        answer = requests.post(url, json={}, timeout=10)
    assert answer.status_code == 424  # not retried by azure-core (a 503 would be)
    assert "npm install -g azurite" in answer.json()["error"]["message"]
