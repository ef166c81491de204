"""The ``dask-amlcompute`` command line."""

from __future__ import annotations

import argparse
import json
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(n_nodes=args.nodes, processes_per_node=args.processes, quiet=args.quiet)


def _emulator(args: argparse.Namespace, rest: list[str]) -> int:
    from .emulator.cli import run_emulator_cli

    return run_emulator_cli(rest) or 0


def _env(args: argparse.Namespace) -> int:
    from .environment import DEFAULT_IMAGE, conda_spec

    print(json.dumps({"image": DEFAULT_IMAGE, "conda": conda_spec()}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dask-amlcompute`` console script."""
    parser = argparse.ArgumentParser(
        prog="dask-amlcompute", description="Dask clusters on Azure ML compute clusters."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a 3-node cluster on the local AML emulator")
    demo.add_argument("--nodes", type=int, default=3)
    demo.add_argument("--processes", type=int, default=1, help="worker processes per node")
    demo.add_argument("--quiet", action="store_true")
    sub.add_parser("emulator", help="run the local AML emulator (see --help)", add_help=False)
    env = sub.add_parser("env", help="show the node environment the library would use")
    env.add_argument("--print", action="store_true", default=True)
    args, rest = parser.parse_known_args(argv)
    if args.command == "emulator":
        return _emulator(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return {"demo": _demo, "env": _env}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
