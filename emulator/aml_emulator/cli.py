"""``aml-emulator``: run the local AML emulator in the foreground."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from . import identity
from .netns import NetworkNamespaceError
from .network import NETWORK_MODES

USAGE_TEMPLATE = """\
Azure ML emulator serving at {base_url}  (offline stand-in: jobs run as local processes)
  subscription {sub}, resource group {rg}, workspace {ws}, region {region}
  computes: {computes}
  network:  {network}
  work dir: {tempdir}
  status:   {base_url}/emulator/status

Point an unmodified MLClient at it from Python:

    from aml_emulator import make_ml_client
    ml_client = make_ml_client("{base_url}"{cert_arg})

(this builds azure.ai.ml.MLClient with an emulator credential and a transport that
 sends every request to this address; no Azure login, no environment variables).

Press Ctrl-C to stop; every node process is killed on exit.
"""


#: How each network mode is described at start.
NETWORK_NOTES = {
    "loopback": "loopback (nodes reachable from this machine, as in the compute's VNet)",
    "isolated": "isolated (a network namespace per compute: nodes reachable only through "
    "their SSH endpoints)",
}


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the emulator command.

    Returns
    -------
    argparse.ArgumentParser
        The parser.
    """
    parser = argparse.ArgumentParser(
        prog="aml-emulator",
        description="Run a local emulator of the Azure ML workspace API (for tests and demos).",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="YAML/JSON file with computes, environments, provisioning_delay, port",
    )
    parser.add_argument("--port", type=int, default=None, help="listen port (default: config or 0)")
    parser.add_argument("--host", default=None, help="loopback listen address (default 127.0.0.1)")
    parser.add_argument(
        "--https",
        action="store_true",
        default=None,
        help="serve HTTPS with a generated self-signed certificate",
    )
    parser.add_argument(
        "--provisioning-delay",
        type=float,
        default=None,
        metavar="SECONDS",
        help="seconds each job spends in Preparing",
    )
    parser.add_argument(
        "--request-latency",
        type=float,
        default=None,
        metavar="SECONDS",
        help="seconds every control-plane and run-history request waits (a round trip to Azure)",
    )
    parser.add_argument(
        "--no-build",
        dest="build_environments",
        action="store_false",
        default=None,
        help="do not build environments: every node runs on the emulator's own interpreter "
        "(fast; for jobs whose environment does not matter)",
    )
    parser.add_argument(
        "--network",
        choices=NETWORK_MODES,
        default=None,
        help="loopback (default): nodes reachable from this machine, as from a compute "
        "instance in the compute's VNet; isolated: each compute's nodes in their own network "
        "namespace, reachable only through their SSH endpoints, as from a laptop "
        "(needs root or CAP_SYS_ADMIN and util-linux unshare/nsenter)",
    )
    return parser


def _make_emulator(args: argparse.Namespace) -> Any:
    from .config import EmulatorConfig
    from .emulator import Emulator

    overrides = {
        "port": args.port,
        "host": args.host,
        "https": args.https,
        "provisioning_delay": args.provisioning_delay,
        "request_latency": args.request_latency,
        "build_environments": args.build_environments,
        "network": args.network,
    }
    if args.config:
        return Emulator.from_file(args.config, **overrides)
    config = EmulatorConfig(**{k: v for k, v in overrides.items() if v is not None})
    return Emulator(config=config)


def run_emulator_cli(
    argv: Sequence[str] | None = None,
    *,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Run the emulator until Ctrl-C / SIGTERM (or ``stop`` is set).

    Parameters
    ----------
    argv
        Command-line arguments (default: ``sys.argv[1:]``).
    ready
        Set once the emulator serves (for tests).
    stop
        Setting it stops the emulator (for tests; signals are only handled
        when running in the main thread).

    Returns
    -------
    int
        Process exit code.
    """
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        emu = _make_emulator(args)
    except (OSError, ValueError) as exc:
        print(f"aml-emulator: {exc}", file=sys.stderr)
        return 2
    stop = stop or threading.Event()
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        try:
            emu.start()
        except NetworkNamespaceError as exc:
            print(f"aml-emulator: {exc}", file=sys.stderr)
            return 2
        computes = ", ".join(f"{c.name} ({c.kind}, max {c.max_nodes})" for c in emu.config.computes)
        print(
            USAGE_TEMPLATE.format(
                base_url=emu.base_url,
                sub=identity.SUBSCRIPTION_ID,
                rg=identity.RESOURCE_GROUP,
                ws=identity.WORKSPACE_NAME,
                region=identity.REGION,
                computes=computes,
                network=NETWORK_NOTES[emu.config.network],
                tempdir=emu.tempdir,
                cert_arg=f', cert_path="{emu.cert_path}"' if emu.cert_path else "",
            ),
            flush=True,
        )
        if ready is not None:
            ready.set()
        while not stop.wait(0.5):
            pass
        print("stopping the emulator...", flush=True)
    finally:
        emu.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_emulator_cli())
