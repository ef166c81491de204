"""A module the nodes lack: the scheduler plugin notes it, the client names it once (issue 27)."""

from __future__ import annotations

import asyncio
import logging
from importlib.metadata import version
from types import SimpleNamespace

from dask_amlcompute.backend.jobwait import missing_module_hint
from dask_amlcompute.node.plugins import MissingModules, NoClientTimeout, heartbeat


def test_the_hint_names_the_module_its_distribution_at_the_clients_version_and_the_fix():
    hint = missing_module_hint("sklearn")
    pin = f"scikit-learn=={version('scikit-learn')}"
    assert hint == (
        "Tasks failed: the cluster's nodes have no module 'sklearn' (this client has it from "
        f"{pin}): add pip_packages=['{pin}'], or use stack='installed'."
    )


def test_a_namespace_package_names_only_the_distribution_with_that_subpackage():
    # "azure" comes from a dozen azure-* distributions; "azure.ai" from azure-ai-ml only
    assert f"pip_packages=['azure-ai-ml=={version('azure-ai-ml')}']" in missing_module_hint(
        "azure.ai"
    )


def test_a_module_no_distribution_provides_points_to_the_code_folder():
    hint = missing_module_hint("my_local_helpers_xyz")
    assert "'my_local_helpers_xyz'" in hint and "code=" in hint and "pip_packages" not in hint


def started(plugin: MissingModules, *others) -> SimpleNamespace:
    """A scheduler with ``plugin`` (started) and ``others``: what the heartbeat handler reads."""
    asyncio.run(plugin.start(SimpleNamespace()))
    return SimpleNamespace(id="Scheduler-1", plugins={p.name: p for p in (plugin, *others)})


def test_erred_tasks_and_failed_graphs_are_reported_once_per_module():
    plugin = MissingModules()
    # the one handler gathers every plugin's part (here the no-client timeout's), in any order
    scheduler = started(plugin, NoClientTimeout(600.0))
    try:
        for key in ("a", "b"):  # a task importing sklearn errs, twice
            text = "ModuleNotFoundError(\"No module named 'sklearn'\")"
            plugin.transition(key, "processing", "erred", exception_text=text)
        plugin.transition("c", "processing", "memory")
        # the scheduler cannot unpickle a graph: distributed logs while handling the error
        for _ in range(2):
            try:
                try:
                    import no_such_module_xyz  # noqa: F401
                except ImportError as exc:
                    raise RuntimeError("Error during deserialization of the task graph") from exc
            except RuntimeError as exc:
                logging.getLogger("distributed.scheduler").error(str(exc))
        first = heartbeat(scheduler)
        expected = {"id": "Scheduler-1", "timeout": 600.0}  # the id: the client's check
        assert first == {**expected, "missing_modules": ["sklearn", "no_such_module_xyz"]}
        assert heartbeat(scheduler)["missing_modules"] == []  # told once
        scheduler.plugins = dict(reversed(scheduler.plugins.items()))
        assert heartbeat(scheduler) == {**expected, "missing_modules": []}
    finally:
        asyncio.run(plugin.close())
    assert plugin.filter not in logging.getLogger("distributed.scheduler").filters


def test_without_a_no_client_timeout_the_heartbeat_still_answers():
    plugin = MissingModules()
    try:
        assert heartbeat(started(plugin)) == {"id": "Scheduler-1", "missing_modules": []}
    finally:
        asyncio.run(plugin.close())
