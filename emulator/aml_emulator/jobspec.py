"""Parsing of submitted command jobs and the environment variables AML gives each node."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from . import identity
from .errors import ApiError

#: Port AML uses for MASTER_PORT / AZ_BATCH_MASTER_NODE.
MASTER_PORT = 6105
#: Port used in the emulated TF_CONFIG cluster spec.
TF_PORT = 2222
#: Distributions of a multi-node job AML runs interactive services (SSH included) for:
#: "You can't enable interactive applications on distributed training runs where the
#: distribution type is anything other than PyTorch, TensorFlow, or MPI" (how-to-interactive-jobs).
SSH_SERVICE_DISTRIBUTIONS = ("PyTorch", "TensorFlow", "Mpi")

_JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,254}$")
_DURATION = re.compile(
    r"^P(?:(?P<d>\d+(?:\.\d+)?)D)?(?:T(?:(?P<h>\d+(?:\.\d+)?)H)?(?:(?P<m>\d+(?:\.\d+)?)M)?"
    r"(?:(?P<s>\d+(?:\.\d+)?)S)?)?$"
)


def parse_duration(value: Any) -> float | None:
    """Parse an ISO 8601 duration (``PT1H``, ``PT30S``, ``P1DT2H``) into seconds.

    Parameters
    ----------
    value
        Duration string, number of seconds, or None.

    Returns
    -------
    float or None
        Seconds, or None when ``value`` is None.

    Raises
    ------
    ApiError
        400 if the value is not a valid duration.
    """
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    m = _DURATION.match(str(value).strip().upper()) if isinstance(value, str) else None
    if not m or value.strip().upper() in ("P", "PT"):
        raise ApiError(
            400, "BadRequest", f"invalid ISO 8601 duration for limits.timeout: {value!r}"
        )
    parts = {k: float(v) if v else 0.0 for k, v in m.groupdict().items()}
    return parts["d"] * 86400 + parts["h"] * 3600 + parts["m"] * 60 + parts["s"]


@dataclass
class JobSpec:
    """The parts of a command job body the emulator acts on."""

    name: str
    properties: dict[str, Any]
    command: str
    compute: str
    instance_count: int
    distribution_type: str | None
    process_count_per_instance: int
    timeout_seconds: float | None
    experiment_name: str
    environment_variables: dict[str, str]
    #: ARM id of the job's code snapshot (``properties.codeId``), None without ``code=``.
    code_id: str | None = None
    #: The SSH services the job declared (``properties.services``, type ``SSH``).
    ssh_services: tuple[SshServiceSpec, ...] = ()
    #: Serverless: no ``computeId`` (or ``"serverless"``); AML runs the job on nodes of
    #: ``instance_type`` it manages itself (Microsoft Learn, *how-to-use-serverless-compute*).
    serverless: bool = False
    #: ``resources.instanceType`` (the VM size of a serverless job).
    instance_type: str | None = None
    #: ``queueSettings.jobTier``: ``Standard`` (dedicated VMs) or ``Spot`` (low priority).
    job_tier: str | None = None


@dataclass(frozen=True)
class SshServiceSpec:
    """An SSH job service declared in ``properties.services`` (``SshJobService``).

    Parameters
    ----------
    name
        The service's key in ``properties.services`` (``"ssh"`` in AML's samples).
    public_keys
        OpenSSH public key lines of ``properties.sshPublicKeys``.
    all_nodes
        ``nodes: {"nodesValueType": "All"}``: the service runs on every node;
        otherwise on rank 0 only.
    """

    name: str
    public_keys: tuple[str, ...]
    all_nodes: bool

    def on_node(self, rank: int) -> bool:
        """Whether the service runs on the node of rank ``rank``."""
        return self.all_nodes or rank == 0


def _public_key_lines(name: str, value: Any) -> tuple[str, ...]:
    """The key lines of an SSH service's ``sshPublicKeys``; 400 when missing or invalid."""
    lines = (
        tuple(
            line.strip()
            for line in value.splitlines()
            if line.strip() and not line.strip().startswith("#")
        )
        if isinstance(value, str)
        else ()
    )
    if not lines:
        raise ApiError(
            400,
            "UserError",
            f"Job service '{name}' of type SSH has no public key: set "
            "properties.sshPublicKeys to the OpenSSH public key(s) allowed to log in "
            "(SshJobService(ssh_public_keys=...)).",
        )
    import asyncssh

    for line in lines:
        try:
            asyncssh.import_public_key(line)
        except (asyncssh.KeyImportError, ValueError):
            raise ApiError(
                400,
                "UserError",
                f"Job service '{name}': {line[:40]!r}... is not an OpenSSH public key "
                "(expected a line such as 'ssh-ed25519 AAAA... comment').",
            ) from None
    return lines


def parse_services(
    services: Any, distribution_type: str | None, instance_count: int = 1
) -> tuple[SshServiceSpec, ...]:
    """Validate a job's ``properties.services`` and return its SSH services.

    Services of other types (``JupyterLab``, ``TensorBoard``, ``VSCode``,
    ``Custom``...) are accepted and not run: the emulator serves only SSH.
    As AML documents it, an SSH service needs a single-node job or a PyTorch,
    TensorFlow or MPI distribution ("custom distributed training setup ...
    isn't currently supported"); AML's reaction to other jobs is not
    documented, the emulator refuses them at submit.

    Parameters
    ----------
    services
        ``properties.services`` of the job body (None when absent).
    distribution_type
        ``distribution.distributionType`` of the job.
    instance_count
        ``resources.instanceCount`` of the job.

    Returns
    -------
    tuple of SshServiceSpec
        The declared SSH services, in body order.

    Raises
    ------
    ApiError
        400 for a malformed ``services`` object, an SSH service without
        ``sshPublicKeys`` or with an invalid key, or an SSH service on a
        multi-node job without a PyTorch, TensorFlow or MPI distribution.
    """
    if services is None:
        return ()
    if not isinstance(services, dict):
        raise ApiError(400, "BadRequest", "properties.services must be an object")
    found: list[SshServiceSpec] = []
    for name, service in services.items():
        if not isinstance(service, dict):
            raise ApiError(400, "BadRequest", f"properties.services.{name} must be an object")
        if str(service.get("jobServiceType") or "").lower() != "ssh":
            continue
        if distribution_type not in SSH_SERVICE_DISTRIBUTIONS and instance_count > 1:
            raise ApiError(
                400,
                "UserError",
                f"Job service '{name}' of type SSH is not supported on a {instance_count}-node "
                f"job with distribution {distribution_type or 'not set'}: interactive services "
                "need a single-node job or a PyTorch, TensorFlow or MPI distribution.",
            )
        props = service.get("properties") or {}
        if not isinstance(props, dict):
            raise ApiError(
                400, "BadRequest", f"properties.services.{name}.properties must be an object"
            )
        keys = _public_key_lines(name, props.get("sshPublicKeys"))
        nodes = service.get("nodes")
        if nodes is not None and not (
            isinstance(nodes, dict) and str(nodes.get("nodesValueType") or "").lower() == "all"
        ):
            raise ApiError(
                400,
                "BadRequest",
                f"properties.services.{name}.nodes must be null or {{'nodesValueType': 'All'}}",
            )
        found.append(SshServiceSpec(name=str(name), public_keys=keys, all_nodes=nodes is not None))
    return tuple(found)


def _resource_name(value: str) -> str:
    return value.rstrip("/").split("/")[-1].removeprefix("azureml:")


def parse_job(name: str, body: Any) -> JobSpec:
    """Validate a ``PUT /jobs/{name}`` body.

    Parameters
    ----------
    name
        Job name from the URL.
    body
        Parsed JSON body.

    Returns
    -------
    JobSpec
        The parsed job.

    Raises
    ------
    ApiError
        400 on a malformed body or an unsupported job type.
    """
    if not _JOB_NAME.match(name):
        raise ApiError(400, "BadRequest", f"invalid job name {name!r}")
    if not isinstance(body, dict) or not isinstance(body.get("properties"), dict):
        raise ApiError(400, "BadRequest", "request body must be a JSON object with 'properties'")
    props = body["properties"]
    job_type = props.get("jobType")
    if job_type != "Command":
        raise ApiError(
            400,
            "BadRequest",
            f"jobType {job_type!r} is not supported by the emulator (only 'Command')",
        )
    command = props.get("command")
    if not isinstance(command, str) or not command.strip():
        raise ApiError(400, "BadRequest", "properties.command must be a non-empty string")
    compute_id = props.get("computeId")
    if compute_id is not None and (not isinstance(compute_id, str) or not compute_id):
        raise ApiError(400, "BadRequest", "properties.computeId must be a non-empty string")
    # No compute (or azure-ai-ml's SERVERLESS_COMPUTE, "serverless"): a serverless job.
    serverless = compute_id is None or _resource_name(compute_id).lower() == "serverless"
    if not isinstance(props.get("environmentId"), str):
        raise ApiError(400, "BadRequest", "properties.environmentId is required")
    resources = props.get("resources") or {}
    if not isinstance(resources, dict):
        raise ApiError(400, "BadRequest", "properties.resources must be an object")
    count = resources.get("instanceCount", 1)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ApiError(400, "BadRequest", "resources.instanceCount must be a positive integer")
    instance_type = resources.get("instanceType")
    if instance_type is not None and (not isinstance(instance_type, str) or not instance_type):
        raise ApiError(400, "BadRequest", "resources.instanceType must be a non-empty string")
    queue = props.get("queueSettings") or {}
    if not isinstance(queue, dict):
        raise ApiError(400, "BadRequest", "properties.queueSettings must be an object")
    job_tier = queue.get("jobTier")
    if str(job_tier or "Null").lower() not in ("null", "standard", "spot"):
        raise ApiError(
            400,
            "UserError",
            f"queueSettings.jobTier {job_tier!r} is not supported: use Standard or Spot",
        )
    dist = props.get("distribution") or {}
    if not isinstance(dist, dict):
        raise ApiError(400, "BadRequest", "properties.distribution must be an object")
    dist_type = dist.get("distributionType")
    if dist_type not in (None, "PyTorch", "Mpi", "TensorFlow"):
        raise ApiError(400, "BadRequest", f"unsupported distributionType {dist_type!r}")
    per_instance = dist.get("processCountPerInstance") or dist.get("workerCount") or 1
    if not isinstance(per_instance, int) or per_instance < 1:
        raise ApiError(400, "BadRequest", "processCountPerInstance must be a positive integer")
    limits = props.get("limits") or {}
    if not isinstance(limits, dict):
        raise ApiError(400, "BadRequest", "properties.limits must be an object")
    env_vars = props.get("environmentVariables") or {}
    if not isinstance(env_vars, dict):
        raise ApiError(400, "BadRequest", "properties.environmentVariables must be an object")
    code_id = props.get("codeId")
    if code_id is not None and (not isinstance(code_id, str) or not code_id.strip()):
        raise ApiError(400, "BadRequest", "properties.codeId must be a non-empty string")
    ssh_services = parse_services(props.get("services"), dist_type, count)
    return JobSpec(
        name=name,
        properties=props,
        command=command,
        compute="serverless" if serverless else _resource_name(str(compute_id)),
        instance_count=count,
        distribution_type=dist_type,
        process_count_per_instance=per_instance,
        timeout_seconds=parse_duration(limits.get("timeout")),
        experiment_name=props.get("experimentName") or "Default",
        environment_variables={str(k): str(v) for k, v in env_vars.items()},
        code_id=code_id,
        ssh_services=ssh_services,
        serverless=serverless,
        instance_type=instance_type,
        job_tier=None if str(job_tier or "Null").lower() == "null" else str(job_tier),
    )


def environment_reference(environment_id: str) -> tuple[str, str] | None:
    """Split a workspace environment ARM id into name and version.

    Parameters
    ----------
    environment_id
        ``environmentId`` of the job.

    Returns
    -------
    tuple or None
        ``(name, version)`` for ``.../environments/{name}/versions/{v}`` ids,
        None for curated / registry references the emulator accepts as-is.
    """
    m = re.search(r"/environments/([^/]+)/versions/([^/]+)$", environment_id, re.IGNORECASE)
    if m and "/workspaces/" in environment_id.lower():
        return m.group(1), m.group(2)
    return None


def node_variables(
    spec: JobSpec,
    rank: int,
    ips: list[str],
    tracking_uri: str,
    cert_path: str | None = None,
    *,
    tracking_token: str | None = None,
    trusted_ca: str | None = None,
) -> dict[str, str]:
    """Return the variables AML sets on node ``rank`` of a job.

    Parameters
    ----------
    spec
        The job.
    rank
        Node rank (0-based).
    ips
        "Private IPs" of all the job's nodes, rank order.
    tracking_uri
        MLflow tracking URI for the workspace.
    cert_path
        Certificate nodes must trust for an HTTPS emulator.
    tracking_token
        The run's ``MLFLOW_TRACKING_TOKEN`` (AML sets it with an ``azureml://``
        tracking URI; ``azureml-mlflow`` sends it as the bearer token).
    trusted_ca
        CA certificate of the tracking endpoint, put in the node's trust store
        (``SSL_CERT_FILE``, ``REQUESTS_CA_BUNDLE``): on AML the endpoint has a
        certificate every node trusts; here it is the emulator's own CA.

    Returns
    -------
    dict
        Variable name to value, the job's ``environmentVariables`` last
        (they override the emulator's, as on AML).

    Notes
    -----
    One process is started per node even when ``processCountPerInstance``
    is larger; ``WORLD_SIZE``/``OMPI_COMM_WORLD_SIZE`` therefore count
    nodes, and the requested count is exposed as
    ``AZUREML_EMULATOR_PROCESS_COUNT_PER_INSTANCE``.
    """
    n = len(ips)
    env: dict[str, str] = {
        "AZUREML_RUN_ID": spec.name,
        "AZUREML_ARM_SUBSCRIPTION": identity.SUBSCRIPTION_ID,
        "AZUREML_ARM_RESOURCEGROUP": identity.RESOURCE_GROUP,
        "AZUREML_ARM_WORKSPACE_NAME": identity.WORKSPACE_NAME,
        "AZUREML_ARM_PROJECT_NAME": spec.experiment_name,
        "AZUREML_EXPERIMENT_NAME": spec.experiment_name,
        "AZUREML_NODE_COUNT": str(n),
        "AZUREML_COMPUTE_TARGET": spec.compute,
        "AZUREML_EMULATOR": "1",
        "AZUREML_EMULATOR_PROCESS_COUNT_PER_INSTANCE": str(spec.process_count_per_instance),
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_RUN_ID": spec.name,
        "MLFLOW_EXPERIMENT_NAME": spec.experiment_name,
        "MLFLOW_EXPERIMENT_ID": spec.experiment_name,  # the emulator's experiment id is its name
    }
    if tracking_token:
        env["MLFLOW_TRACKING_TOKEN"] = tracking_token
    if trusted_ca:
        env["SSL_CERT_FILE"] = env["REQUESTS_CA_BUNDLE"] = trusted_ca
    if cert_path:
        env["MLFLOW_TRACKING_SERVER_CERT_PATH"] = cert_path
        env["AZUREML_EMULATOR_CA_CERT"] = cert_path
    master = ips[0]
    if spec.distribution_type == "PyTorch":
        env.update(
            {
                "MASTER_ADDR": master,
                "MASTER_PORT": str(MASTER_PORT),
                "WORLD_SIZE": str(n),
                "NODE_RANK": str(rank),
                "RANK": str(rank),
                "LOCAL_RANK": "0",
                "LOCAL_WORLD_SIZE": "1",
                "GROUP_RANK": str(rank),
            }
        )
    elif spec.distribution_type == "Mpi":
        env.update(
            {
                "OMPI_COMM_WORLD_RANK": str(rank),
                "OMPI_COMM_WORLD_SIZE": str(n),
                "OMPI_COMM_WORLD_LOCAL_RANK": "0",
                "OMPI_COMM_WORLD_LOCAL_SIZE": "1",
                "OMPI_COMM_WORLD_NODE_RANK": str(rank),
                "AZ_BATCH_MASTER_NODE": f"{master}:{MASTER_PORT}",
                "AZ_BATCHAI_MPI_MASTER_NODE": master,
            }
        )
    elif spec.distribution_type == "TensorFlow":
        env["TF_CONFIG"] = json.dumps(
            {
                "cluster": {"worker": [f"{ip}:{TF_PORT}" for ip in ips]},
                "task": {"type": "worker", "index": rank},
            }
        )
    env.update(spec.environment_variables)
    return env


def environment_report(environment_id: str, properties: dict[str, Any] | None) -> list[str]:
    """What a job's environment asks for, for the node log header and a job property.

    The conda and pip requirements are built into an isolated virtualenv
    (:mod:`~aml_emulator.envbuild`) unless builds are off; the
    image is never pulled.

    Parameters
    ----------
    environment_id
        ``environmentId`` of the job.
    properties
        REST ``properties`` of the workspace environment version (``image``,
        ``condaFile``), None for references the emulator cannot resolve.

    Returns
    -------
    list of str
        Lines for the node log header, e.g. ``pip requirements: dask==...``.
    """
    import sys

    import yaml

    lines = [f"environment {environment_id}"]
    props = properties or {}
    if props.get("image"):
        lines.append(f"image {props['image']} (not pulled)")
    conda_text = props.get("condaFile")
    try:
        conda = yaml.safe_load(conda_text) if isinstance(conda_text, str) else conda_text
    except yaml.YAMLError:
        conda = None
    deps = conda.get("dependencies") if isinstance(conda, dict) else None
    if isinstance(deps, list):
        pip = [p for d in deps if isinstance(d, dict) for p in d.get("pip") or []]
        packages = [str(d) for d in deps if not isinstance(d, dict)]
        lines.append("conda dependencies: " + (", ".join(packages) or "-"))
        lines.append("pip requirements: " + (", ".join(map(str, pip)) or "-"))
    elif properties is None:
        lines.append("not a workspace environment: recorded only")
    version = ".".join(map(str, sys.version_info[:3]))
    lines.append(f"nodes run {sys.executable} (Python {version}) instead")
    return lines
