"""``dask-amlcompute run``: :func:`~dask_amlcompute.jobmode.submit_script` from the command line.

On the workspace config's ``MLClient``, or a local emulator's (``--emulator``); options left
out take their ``amlcompute.*`` dask config values.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..exceptions import AmlComputeError, JobError
from ..jobmode import submit_script
from .manage import count


def run_cli(argv: Sequence[str]) -> int:
    """``dask-amlcompute run SCRIPT --nodes N --compute NAME [...] [-- SCRIPT ARGS]``.

    Returns the process exit code: 0 when the job completed, the script's exit
    code (or 1) when it failed, 2 for bad arguments or when nothing was submitted,
    130 when interrupted (the job is cancelled first).
    """
    try:
        return _run_cli(list(argv))
    except SystemExit as exc:  # argparse: --help or a usage error
        return exc.code if isinstance(exc.code, int) else 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dask-amlcompute run",
        description="Run a Dask script as one AML job: rank 0 runs the scheduler and the "
        "script, the other nodes run workers; the job ends when the script does. "
        "Arguments after -- go to the script.",
    )
    add = p.add_argument
    add("script", help="the Python script (Client() in it connects to the job's cluster)")
    add("--nodes", type=count, default=1, help="nodes of the job (default 1)")
    add("--compute", help="AmlCompute cluster (default with --emulator: cpu-cluster)")
    add("--processes", type=count, help="worker processes per node (default: config, 1)")
    add("--threads", type=count, help="threads per worker process")
    add("--job-timeout", help="AML job time limit (default: amlcompute.job-timeout)")
    add("--experiment", help="AML experiment (default: amlcompute.experiment-name)")
    add("--name", help="AML job name (default dask-run-<random>)")
    add("--environment", help="AML environment (name@latest, name:version or image)")
    add("--code", help="upload this folder as the code snapshot (SCRIPT relative to it)")
    add("--env-var", action="append", default=[], metavar="KEY=VALUE")
    add("--tls", action="store_true", default=None,
        help="TLS between the script, the scheduler and the workers (temporary certificate)")  # fmt: skip
    add("--idle-timeout", help="stop the job after this long without Dask tasks (default: none)")
    where = p.add_mutually_exclusive_group()  # the emulator stops when this command ends
    where.add_argument("--no-wait", action="store_true", help="return after submitting")
    where.add_argument("--emulator", action="store_true", help="run on a local AML emulator")
    add("--workspace-config", help="path of the workspace config.json")
    add("--quiet", action="store_true")
    return p


def _run_cli(argv: list[str]) -> int:
    cut = argv.index("--") if "--" in argv else len(argv)
    p = _parser()
    args = p.parse_args(argv[:cut])
    if bad := [kv for kv in args.env_var if "=" not in kv]:
        p.error(f"--env-var {bad[0]!r}: give KEY=VALUE")
    env_vars = dict(kv.split("=", 1) for kv in args.env_var) or None
    emulator = None
    try:
        if args.emulator:
            from aml_emulator import ComputeSpec, Emulator

            args.compute = args.compute or "cpu-cluster"
            emulator = Emulator(computes=[ComputeSpec(args.compute, max_nodes=max(4, args.nodes))])
            emulator.start()
            ml_client = emulator.ml_client()
        else:
            if not args.compute:
                p.error("--compute is required (the AmlCompute cluster to run on)")
            from ..backend.workspace import ml_client_from_config

            ml_client = ml_client_from_config(args.workspace_config)
        run = submit_script(
            ml_client, args.script, compute=args.compute, n_nodes=args.nodes,
            processes_per_node=args.processes, threads_per_process=args.threads,
            script_args=argv[cut + 1 :], job_timeout=args.job_timeout,
            experiment_name=args.experiment, name=args.name, environment=args.environment,
            env_vars=env_vars, code=args.code, security=args.tls, idle_timeout=args.idle_timeout,
            wait=not args.no_wait, quiet=args.quiet, poll_interval=0.5 if args.emulator else 2.0,
        )  # fmt: skip
    except KeyboardInterrupt:  # submit_script cancelled the job before re-raising
        print("dask-amlcompute run: interrupted", file=sys.stderr)
        return 130
    except JobError as exc:
        print(str(exc), file=sys.stderr)
        return getattr(exc, "exit_code", None) or 1
    except (AmlComputeError, ValueError, OSError) as exc:
        print(f"dask-amlcompute run: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    finally:
        if emulator is not None:
            emulator.stop()
    if not args.quiet and run.output:
        print(run.output, end="" if run.output.endswith("\n") else "\n")
    print(f"AML job {run.job_name}: {run.status}")
    return 0
