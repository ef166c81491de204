"""The ``dask-amlcompute`` command line."""

from __future__ import annotations

import argparse
import json
import signal
import sys

from ..exceptions import AmlComputeError, ConfigurationError, WorkspaceNotConfiguredError

#: Said when a command needs the AML emulator and it is not installed.
EMULATOR_MISSING = (
    "dask-amlcompute: the local AML emulator is not installed. It is its own package in the "
    "dask-amlcompute repository: run `pip install -e ./emulator` in a checkout of it."
)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.nodes, args.processes, args.quiet, args.network)


def _env(args: argparse.Namespace) -> int:
    from ..backend.environment import build_spec
    from ..config import checked, resolve_settings

    s = resolve_settings()  # the settings of a cluster started here
    spec = build_spec(
        extra_pip=checked("pip-packages", [*s.pip_packages, *args.extra]),
        extra_conda=[*(s.conda_packages or []), *args.extra_conda],
        node_package=args.node_package or s.node_package,
        image=args.image,
        stack=args.stack or s.stack,
        gpu=args.gpu,
    )
    if args.action == "build":
        from .manage import register_environment

        return register_environment(args, spec)
    if args.format == "json":
        info = {"image": spec.image, "conda": spec.conda_dict(), "content_hash": spec.content_hash,
                "aml_environment": f"CliV2AnonymousEnvironment:{spec.aml_version}"}  # fmt: skip
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
    else:
        method = {"conda": "conda_yaml", "pip": "requirements"}.get(args.format, args.format)
        sys.stdout.write(getattr(spec, method)())
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dask-amlcompute`` console script."""
    signal.signal(signal.SIGTERM, _interrupt)  # so that ``with`` blocks close clusters cleanly
    try:
        return _main(sys.argv[1:] if argv is None else list(argv))
    except ModuleNotFoundError as exc:  # demo, run --emulator, --emulator URL
        if exc.name != "aml_emulator":
            raise
        print(EMULATOR_MISSING, file=sys.stderr)
        return 2


def _main(argv: list[str]) -> int:
    if argv[:1] == ["run"]:  # the script's own arguments follow: jobmode parses them
        from .run import run_cli

        return run_cli(argv[1:])
    from . import manage

    parser = argparse.ArgumentParser(
        prog="dask-amlcompute", description="Dask clusters on Azure ML compute clusters."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a 3-node cluster on the local AML emulator")
    demo.add_argument("--nodes", type=manage.count, default=3)
    demo.add_argument("--processes", type=manage.count, default=1, help="worker processes per node")
    demo.add_argument("--quiet", action="store_true")
    demo.add_argument("--network", choices=("auto", "isolated", "loopback"), default="auto",
                      help="where the emulated nodes live; auto: isolated (unreachable from the "
                      "client, as on a stock workspace) where network namespaces work, else loopback")  # fmt: skip
    sub.add_parser("run", add_help=False, help="run a Dask script as one AML job (run script.py "
                   "--nodes 4 --compute NAME [--emulator] [-- script args])")  # fmt: skip
    workspace = argparse.ArgumentParser(add_help=False)  # where the AML commands go
    workspace.add_argument("--emulator", metavar="URL", help="base URL of an AML emulator")
    workspace.add_argument("--workspace-config", metavar="PATH", help="workspace config.json")
    manage.add_arguments(sub, workspace)
    add = sub.add_parser("env", parents=[workspace], help="show the node environment the library "
                         "would use, or register it (env build)").add_argument  # fmt: skip
    add("action", nargs="?", choices=["show", "build"], default="show",
        help="show (default) or build: register it as a named, versioned AML environment")  # fmt: skip
    add("--name", default=None, help="env build: environment name")
    add("--format", choices=["json", "conda", "pip", "dockerfile"], default="json")
    add("--extra", action="append", default=[], metavar="REQ", help="pip package")
    add("--extra-conda", action="append", default=[], metavar="PKG")
    add("--node-package", metavar="REQ", help="pip spec of dask-amlcompute")
    add("--image", default=None, help="base image (default: AML openmpi image)")
    add("--stack", choices=["sync", "installed", "imported", "none"])
    add("--gpu", action="store_true", help="the GPU sizes' environment (dask-cuda, CUDA image)")
    args = parser.parse_args(argv)
    command = manage.COMMANDS.get(args.command) or {"demo": _demo, "env": _env}[args.command]
    try:
        return command(args)
    except AmlComputeError as exc:  # one line, no traceback: 2 for bad input, else 1
        print(f"dask-amlcompute {args.command}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigurationError | WorkspaceNotConfiguredError) else 1
