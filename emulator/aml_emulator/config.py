"""Configuration of the emulator: compute targets, delays, ports, and file loading."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .datastores import DatastoreSpec
from .network import NETWORK_MODES

#: Compute kinds the emulator reports.  Only ``AmlCompute`` and
#: ``ComputeInstance`` can run jobs; other kinds are listed but reject jobs.
COMPUTE_KINDS = ("AmlCompute", "ComputeInstance", "Kubernetes", "VirtualMachine")

#: ``vmTier`` values of ``estimatedVMPrices`` (azure-rest-api-specs ``VMTier``).
VM_TIERS = ("Standard", "LowPriority", "Spot")


def cache_dir() -> Path:
    """The folder the emulator caches things in (environment builds, Azurite).

    ``$AML_EMULATOR_CACHE``, else ``$XDG_CACHE_HOME/aml-emulator``, else
    ``~/.cache/aml-emulator``; created by whoever writes into it.
    """
    root = os.environ.get("AML_EMULATOR_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aml-emulator"


@dataclass
class ComputeSpec:
    """One compute target of the emulated workspace.

    Parameters
    ----------
    name
        Compute name (``compute=`` of a job).
    max_nodes
        Maximum nodes in use at once, over all jobs (``max_instances``).
        A ``ComputeInstance`` always has exactly one node.
    min_nodes
        Nodes kept allocated while idle (reported as idle by ``listNodes``).
    vm_size
        Reported VM size.
    idle_seconds_before_scaledown
        A freed node stays listed as ``idle`` this long before it disappears.
    admin_user
        SSH admin user of the nodes.
    ssh_public_keys
        OpenSSH public keys accepted for ``admin_user``.
    ssh_public_access
        Whether nodes get a public SSH endpoint (``remoteLoginPortPublicAccess``).
    kind
        ``"AmlCompute"`` (default), ``"ComputeInstance"``, or another reported-only kind.
    vm_priority
        ``"Dedicated"`` or ``"LowPriority"``.
    """

    name: str
    max_nodes: int = 4
    min_nodes: int = 0
    vm_size: str = "STANDARD_DS3_V2"
    idle_seconds_before_scaledown: int = 120
    admin_user: str | None = "azureuser"
    ssh_public_keys: list[str] = field(default_factory=list)
    ssh_public_access: bool = True
    kind: str = "AmlCompute"
    vm_priority: str = "Dedicated"

    def __post_init__(self) -> None:
        if self.kind not in COMPUTE_KINDS:
            raise ValueError(f"compute {self.name!r}: kind must be one of {COMPUTE_KINDS}")
        if self.kind == "ComputeInstance":
            self.max_nodes = 1
            self.min_nodes = 1
        if self.max_nodes < 1 or self.max_nodes > 250:
            raise ValueError(f"compute {self.name!r}: max_nodes must be in 1..250")
        if not 0 <= self.min_nodes <= self.max_nodes:
            raise ValueError(f"compute {self.name!r}: min_nodes must be in 0..max_nodes")
        priority = str(self.vm_priority).replace("_", "").replace("-", "").lower()
        if priority not in ("dedicated", "lowpriority"):
            raise ValueError(f"compute {self.name!r}: vm_priority must be Dedicated or LowPriority")
        self.vm_priority = "LowPriority" if priority == "lowpriority" else "Dedicated"
        if isinstance(self.ssh_public_keys, str):
            self.ssh_public_keys = [self.ssh_public_keys]
        self.ssh_public_keys = [k.strip() for k in self.ssh_public_keys if k and k.strip()]

    @property
    def runs_jobs(self) -> bool:
        """Whether jobs can be submitted to this compute."""
        return self.kind in ("AmlCompute", "ComputeInstance")

    @property
    def ssh_enabled(self) -> bool:
        """Whether nodes get an SSH endpoint (public access, admin user and a key)."""
        return bool(self.ssh_public_access and self.admin_user and self.ssh_public_keys)


@dataclass
class EnvironmentSpec:
    """A pre-registered environment version (``name@latest`` / ``name:version``).

    Parameters
    ----------
    name
        Environment name.
    version
        Version label.
    image
        Docker image recorded on the environment (not pulled: nodes run on the host).
    """

    name: str
    version: str = "1"
    image: str = "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04:latest"


@dataclass
class VmSizeSpec:
    """One VM size of the emulated region's catalogue (``GET .../locations/{loc}/vmSizes``).

    The fields are those of azure-rest-api-specs' ``VirtualMachineSize``
    (``machinelearningservices`` 2023-08-01-preview, ``examples/VirtualMachineSize/list.json``).

    Parameters
    ----------
    name
        Size name, e.g. ``"Standard_DS3_v2"`` (matched case-insensitively, as AML does).
    family
        Quota family, e.g. ``"standardDSv2Family"``.
    vcpus
        vCPUs per node (what quota counts).
    memory_gb
        Memory per node.
    gpus
        GPUs per node.
    prices
        Illustrative USD per hour for Linux by ``vmTier`` (``"Standard"``,
        ``"LowPriority"``, ``"Spot"``); None: the size has no ``estimatedVMPrices``
        (AML omits them for some sizes).
    low_priority_capable
        Whether low-priority (Spot) nodes of this size exist.
    premium_io
        Premium storage support.
    max_resource_volume_mb
        Temporary disk size.
    supported_compute_types
        Compute types that may use the size.
    """

    name: str
    family: str
    vcpus: int
    memory_gb: float
    gpus: int = 0
    prices: dict[str, float] | None = None
    low_priority_capable: bool = True
    premium_io: bool = True
    max_resource_volume_mb: int = 0
    supported_compute_types: list[str] = field(
        default_factory=lambda: ["AmlCompute", "ComputeInstance"]
    )

    def __post_init__(self) -> None:
        if self.vcpus < 1 or self.gpus < 0 or self.memory_gb <= 0:
            raise ValueError(f"vm size {self.name!r}: vcpus >= 1, gpus >= 0, memory_gb > 0")
        if self.prices is not None:
            unknown = set(self.prices) - set(VM_TIERS)
            if unknown:
                raise ValueError(f"vm size {self.name!r}: price tiers must be among {VM_TIERS}")
            self.prices = {k: float(v) for k, v in self.prices.items()}


def default_vm_sizes() -> list[VmSizeSpec]:
    """Return the default VM size catalogue.

    Sizes, families, vCPUs, memory and GPUs are Azure's; the prices are
    illustrative round numbers, not Azure's (``Standard_F4s_v2`` has none, as
    AML sometimes returns a size without ``estimatedVMPrices``).

    Returns
    -------
    list of VmSizeSpec
        DSv2, DSv3, ESv3, FSv2 CPU sizes and NCSv3 GPU sizes.
    """
    return [
        VmSizeSpec(
            "Standard_DS3_v2",
            "standardDSv2Family",
            4,
            14.0,
            prices={"Standard": 0.29, "LowPriority": 0.06},
            max_resource_volume_mb=28672,
        ),
        VmSizeSpec(
            "Standard_D4s_v3",
            "standardDSv3Family",
            4,
            16.0,
            prices={"Standard": 0.19, "LowPriority": 0.04},
            max_resource_volume_mb=32768,
        ),
        VmSizeSpec(
            "Standard_D16s_v3",
            "standardDSv3Family",
            16,
            64.0,
            prices={"Standard": 0.77, "LowPriority": 0.15},
            max_resource_volume_mb=131072,
        ),
        VmSizeSpec(
            "Standard_E8s_v3",
            "standardESv3Family",
            8,
            64.0,
            prices={"Standard": 0.50, "LowPriority": 0.10},
            max_resource_volume_mb=131072,
        ),
        VmSizeSpec("Standard_F4s_v2", "standardFSv2Family", 4, 8.0, max_resource_volume_mb=32768),
        VmSizeSpec(
            "Standard_NC6s_v3",
            "standardNCSv3Family",
            6,
            112.0,
            gpus=1,
            prices={"Standard": 3.06, "LowPriority": 0.61},
            max_resource_volume_mb=344064,
        ),
        VmSizeSpec(
            "Standard_NC24s_v3",
            "standardNCSv3Family",
            24,
            448.0,
            gpus=4,
            prices={"Standard": 12.24, "LowPriority": 2.45},
            max_resource_volume_mb=1376256,
        ),
    ]


@dataclass
class QuotaSpec:
    """vCPU quota of the emulated subscription in its region (AML compute quota).

    As Microsoft Learn *Manage and increase quotas* describes it: dedicated
    vCPUs have a limit per VM family and a regional total; low-priority vCPUs
    have "a single value across VM families" (per-family low-priority limits
    are reported as -1, i.e. none, unless set here); the total compute limit
    counts clusters and compute instances (default 500).  Defaults are
    generous; lower them (here or with ``emu.set_quota``) to see jobs queue.

    Parameters
    ----------
    dedicated_vcpus
        Total Cluster Dedicated Regional vCPUs.
    low_priority_vcpus
        Total Cluster LowPriority Regional vCPUs.
    family_vcpus
        Dedicated vCPU limit of a family not listed in ``families``.
    families
        Dedicated vCPU limit by family (e.g. ``{"standardNCSv3Family": 0}``).
    low_priority_families
        Low-priority vCPU limit by family (default: none).
    max_computes
        Total compute limit (clusters and compute instances).
    family_value
        ``name.value`` of the per-family usage lines: ``"label"`` (``Standard
        DSv2 Family Cluster Dedicated vCPUs``, as AML's ``examples/Usage/list.json``)
        or ``"id"`` (``standardDSv2Family``, how other resource providers spell
        it); ``localizedValue`` and the ARM id's last segment keep the label.
    """

    dedicated_vcpus: int = 2000
    low_priority_vcpus: int = 2000
    family_vcpus: int = 1000
    families: dict[str, int] = field(default_factory=dict)
    low_priority_families: dict[str, int] = field(default_factory=dict)
    max_computes: int = 500
    family_value: str = "label"

    def __post_init__(self) -> None:
        if self.family_value not in ("label", "id"):
            raise ValueError("family_value must be 'label' or 'id'")
        values = [self.dedicated_vcpus, self.low_priority_vcpus, self.family_vcpus]
        values += [*self.families.values(), *self.low_priority_families.values()]
        if any(v < 0 for v in values) or self.max_computes < 0:
            raise ValueError("quota limits must be >= 0")


def default_computes() -> list[ComputeSpec]:
    """Return the computes used when none are given.

    Returns
    -------
    list of ComputeSpec
        One ``cpu-cluster`` AmlCompute with four nodes.
    """
    return [ComputeSpec(name="cpu-cluster")]


@dataclass
class EmulatorConfig:
    """Everything needed to start an emulator.

    Parameters
    ----------
    computes
        Compute targets of the workspace.
    environments
        Environments registered at start.
    provisioning_delay
        Seconds a job spends in ``Preparing`` before its nodes start.
    host
        Listen address; must be a loopback address.
    port
        Listen port (0 = ephemeral).
    https
        Serve HTTPS with a generated self-signed certificate.
    workdir
        Parent directory for the emulator's temporary directory.
    datastores
        Datastores of the workspace (references to blob endpoints such as Azurite).
    build_environments
        Build each environment with a conda file into its own cached virtualenv
        (as AML builds its image; the job stays ``Preparing`` meanwhile and a failed
        build fails it). False: every node runs on the emulator's own interpreter
        and site-packages (fast; for tests that only check job shapes).
    environment_cache
        Folder of the cached builds (default ``$AML_EMULATOR_ENVS``, else
        ``~/.cache/aml-emulator/envs``).
    build_timeout
        Bound on one environment build, in seconds.
    job_service_delay
        Seconds a job's SSH service (``services={"ssh": SshJobService(...)}``)
        reports ``Starting`` after the job's nodes start, before ``Running``.
        AML takes 30-120 s; the emulator's daemon is ready at once.
    network
        Where the nodes live: ``"loopback"`` (default: every node on its own
        loopback address of this machine, reachable by the client, as from a
        compute instance in the compute's VNet) or ``"isolated"`` (each
        compute's nodes in a Linux network namespace of their own, reachable
        only through their SSH endpoints, as from a laptop; needs root or
        ``CAP_SYS_ADMIN`` and util-linux ``unshare``/``nsenter``; see
        :mod:`aml_emulator.netns`).
    vm_sizes
        The region's VM size catalogue (``list_sizes``); jobs and computes are
        quota-checked with the vCPUs of their size (a configured compute whose
        size is not in the catalogue is not counted).
    quota
        vCPU quota (``list_usage``); a job that does not fit waits in ``Queued``.
    compute_provisioning_delay
        Seconds a compute created or deleted through the API stays ``Creating``
        or ``Deleting`` (the long-running operation's duration).
    request_latency
        Seconds every control-plane (ARM, workspace) and run-history (MLflow
        tracking) request waits before it is served: a round trip to Azure
        (100-300 ms from a laptop). 0 (default): answered at once.
    """

    computes: list[ComputeSpec] = field(default_factory=default_computes)
    environments: list[EnvironmentSpec] = field(default_factory=list)
    provisioning_delay: float = 0.0
    host: str = "127.0.0.1"
    port: int = 0
    https: bool = False
    workdir: str | None = None
    datastores: list[DatastoreSpec] = field(default_factory=list)
    build_environments: bool = True
    environment_cache: str | None = None
    build_timeout: float = 900.0
    job_service_delay: float = 1.0
    network: str = "loopback"
    vm_sizes: list[VmSizeSpec] = field(default_factory=default_vm_sizes)
    quota: QuotaSpec = field(default_factory=QuotaSpec)
    compute_provisioning_delay: float = 0.5
    request_latency: float = 0.0

    def __post_init__(self) -> None:
        for name in ("compute_provisioning_delay", "request_latency"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be a number of seconds >= 0")
        sizes = [v.name.lower() for v in self.vm_sizes]
        if len(set(sizes)) != len(sizes):
            raise ValueError(f"duplicate vm sizes: {[v.name for v in self.vm_sizes]}")
        if not self.build_timeout > 0:
            raise ValueError("build_timeout must be a positive number of seconds")
        if not self.job_service_delay >= 0:
            raise ValueError("job_service_delay must be a number of seconds >= 0")
        if self.network not in NETWORK_MODES:
            raise ValueError(f"network must be one of {NETWORK_MODES}, not {self.network!r}")
        if not self.host.startswith("127."):
            raise ValueError("the emulator only listens on loopback addresses (127.0.0.0/8)")
        names = [c.name for c in self.computes]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate compute names: {names}")
        if len(self.computes) > 250:
            raise ValueError("at most 250 computes")
        stores = [d.name.lower() for d in self.datastores]
        if len(set(stores)) != len(stores):
            raise ValueError(f"duplicate datastore names: {stores}")


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(
            f"{where}: unknown keys {sorted(unknown)}; expected some of {sorted(known)}"
        )
    return cls(**data)


def config_from_dict(data: dict[str, Any]) -> EmulatorConfig:
    """Build an :class:`EmulatorConfig` from plain data (parsed YAML/JSON).

    Parameters
    ----------
    data
        Keys of :class:`EmulatorConfig`; ``computes``, ``environments`` and
        ``vm_sizes`` are lists of mappings with the keys of :class:`ComputeSpec`,
        :class:`EnvironmentSpec` and :class:`VmSizeSpec`; ``quota`` is a mapping
        with the keys of :class:`QuotaSpec`.

    Returns
    -------
    EmulatorConfig
        The validated configuration.

    Raises
    ------
    ValueError
        On unknown keys or invalid values.
    """
    if not isinstance(data, dict):
        raise ValueError("emulator config must be a mapping")
    data = dict(data)
    computes = data.pop("computes", None)
    environments = data.pop("environments", None) or []
    datastores = data.pop("datastores", None) or []
    vm_sizes = data.pop("vm_sizes", None)
    quota = data.pop("quota", None)
    kwargs: dict[str, Any] = dict(data)
    if vm_sizes is not None:
        kwargs["vm_sizes"] = [
            _build(VmSizeSpec, v, f"vm_sizes[{i}]") for i, v in enumerate(vm_sizes)
        ]
    if quota is not None:
        kwargs["quota"] = _build(QuotaSpec, quota, "quota")
    if computes is not None:
        kwargs["computes"] = [
            _build(ComputeSpec, c, f"computes[{i}]") for i, c in enumerate(computes)
        ]
    kwargs["environments"] = [
        _build(EnvironmentSpec, e, f"environments[{i}]") for i, e in enumerate(environments)
    ]
    kwargs["datastores"] = [
        _build(DatastoreSpec, d, f"datastores[{i}]") for i, d in enumerate(datastores)
    ]
    return _build(EmulatorConfig, kwargs, "emulator config")


def load_config(path: str | os.PathLike[str]) -> EmulatorConfig:
    """Read an emulator configuration from a YAML or JSON file.

    Parameters
    ----------
    path
        File path; ``.json`` files are read as JSON, anything else as YAML.

    Returns
    -------
    EmulatorConfig
        The validated configuration.

    Examples
    --------
    A YAML file::

        provisioning_delay: 1.0
        port: 8765
        computes:
          - name: cpu-cluster
            max_nodes: 4
            ssh_public_keys: ["ssh-ed25519 AAAA... me@laptop"]
          - name: my-ci
            kind: ComputeInstance
        environments:
          - {name: dask-env, version: "3", image: "python:3.11"}
        build_environments: true       # false: nodes share the emulator's interpreter
        environment_cache: /tmp/envs   # default ~/.cache/aml-emulator/envs
        build_timeout: 900
        job_service_delay: 1.0         # job SSH service: Starting this long (AML: 30-120 s)
        network: loopback              # isolated: a network namespace per compute (root)
        compute_provisioning_delay: 0.5  # compute create/delete operations take this long
        request_latency: 0.15          # each control-plane / run-history request waits this long
        quota: {dedicated_vcpus: 24, families: {standardNCSv3Family: 0}}
        vm_sizes:                      # replaces the default catalogue
          - {name: Standard_D4s_v3, family: standardDSv3Family, vcpus: 4, memory_gb: 16,
             prices: {Standard: 0.19, LowPriority: 0.04}}
    """
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if str(path).endswith(".json"):
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text) or {}
    return config_from_dict(data)
