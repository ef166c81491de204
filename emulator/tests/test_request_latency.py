"""Request latency (a round trip to Azure) and the request log of the emulator."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from aml_emulator.cli import _make_emulator, build_parser
from aml_emulator.config import EmulatorConfig


def test_latency_applies_to_control_plane_and_is_logged(emu, ml):
    emu.request_log(clear=True)
    emu.request_latency = 0.2
    try:
        with ThreadPoolExecutor(2) as pool:  # two requests at once overlap in the log
            list(pool.map(ml.compute.get, ["cpu-cluster", "small"]))
        requests.get(f"{emu.base_url}/emulator/status", timeout=10)  # not AML: not logged
        log = emu.request_log(clear=True)
    finally:
        emu.request_latency = 0
    gets = [r for r in log if r["method"] == "GET" and "/computes/" in r["path"]]
    assert sorted(r["path"].rsplit("/", 1)[1] for r in gets) == ["cpu-cluster", "small"]
    assert all(r["end"] - r["start"] >= 0.2 and r["status"] == 200 for r in gets)
    first, second = sorted(gets, key=lambda r: r["start"])
    assert second["start"] < first["end"]  # served concurrently, not one after the other
    assert not any("/emulator/" in r["path"] for r in log)
    over_http = requests.get(f"{emu.base_url}/emulator/requests", timeout=10).json()
    assert over_http == []  # cleared above; the status page is not logged either


def test_latency_from_the_command_line_and_config():
    args = build_parser().parse_args(["--request-latency", "0.15"])
    assert _make_emulator(args).config.request_latency == 0.15
    assert _make_emulator(build_parser().parse_args([])).config.request_latency == 0
    with pytest.raises(ValueError, match="request_latency"):
        EmulatorConfig(request_latency=-1)
