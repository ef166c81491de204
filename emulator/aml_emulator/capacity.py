"""VM sizes and vCPU quota of the emulated region: lookups, usage and quota checks.

AML counts quota in vCPUs per subscription and region (Microsoft Learn, *Manage
and increase quotas and limits for resources with Azure Machine Learning*,
``articles/machine-learning/how-to-manage-quotas.md`` in MicrosoftDocs/azure-ai-docs):

* **dedicated** vCPUs have a limit per VM family and a regional total, both
  enforced;
* **low-priority** vCPUs (low-priority clusters, serverless ``Spot`` jobs) have
  one regional total "across VM families";
* a node counts while its VM is allocated: busy with a job, idle before
  scale-down, or kept by ``min_nodes``; serverless jobs "consume the same quota
  as Azure Machine Learning compute quota" (*how-to-use-serverless-compute*).

A job that fits the limits but not what other jobs leave free waits in
``Queued`` ("you get a message that your job must wait in a queue until quota is
available", *how-to-use-serverless-compute*, *Quota*); one that can never fit is
refused (see :meth:`Capacity.never_fits`).  Nothing here speaks HTTP: the routes
are in :mod:`~aml_emulator.compute_api`, the JSON shapes in
:mod:`~aml_emulator.shapes`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .config import QuotaSpec, VmSizeSpec
from .state import ComputeState

#: Quota tiers: ``vmPriority`` of a compute, ``jobTier`` of a serverless job.
DEDICATED = "Dedicated"
LOW_PRIORITY = "LowPriority"
TIERS = (DEDICATED, LOW_PRIORITY)

#: Where AML's quota messages send the user.
QUOTA_DOCS = "https://docs.microsoft.com/azure/machine-learning/how-to-manage-quotas"


def tier_of(value: str | None) -> str:
    """Return the quota tier of a ``vmPriority`` or a serverless ``jobTier``.

    Parameters
    ----------
    value
        ``Dedicated`` / ``LowPriority`` (computes), ``Standard`` / ``Spot`` (jobs), or None.

    Returns
    -------
    str
        ``"Dedicated"`` or ``"LowPriority"`` (``Spot`` runs on low-priority VMs).
    """
    key = str(value or "").replace("_", "").replace("-", "").lower()
    return LOW_PRIORITY if key in ("lowpriority", "spot") else DEDICATED


def family_label(family: str) -> str:
    """Return the display name of a VM family: ``standardDSv2Family`` -> ``Standard DSv2 Family``.

    Parameters
    ----------
    family
        Family as ``vmSizes`` reports it.

    Returns
    -------
    str
        The name AML's usage entries use.
    """
    core = family
    if core.lower().startswith("standard"):
        core = core[len("standard") :]
    if core.lower().endswith("family"):
        core = core[: -len("family")]
    return f"Standard {core} Family" if core else family


def usage_name(family: str | None, tier: str) -> str:
    """Return the name of a usage entry, as AML's ``usages`` list spells it.

    Parameters
    ----------
    family
        VM family, or None for the regional total.
    tier
        ``Dedicated`` or ``LowPriority``.

    Returns
    -------
    str
        e.g. ``Standard DSv2 Family Cluster Dedicated vCPUs`` or
        ``Total Cluster LowPriority Regional vCPUs``.
    """
    if family is None:
        return f"Total Cluster {tier} Regional vCPUs"
    return f"{family_label(family)} Cluster {tier} vCPUs"


@dataclass(frozen=True)
class Demand:
    """vCPUs a compute's (or serverless pool's) nodes take from quota."""

    family: str
    tier: str
    vcpus_per_node: int


class Capacity:
    """The region's VM sizes and vCPU quota, and how much of it the computes use.

    Parameters
    ----------
    sizes
        VM size catalogue.
    quota
        Limits (copied; change them with :meth:`set_limit`).
    """

    def __init__(self, sizes: Iterable[VmSizeSpec], quota: QuotaSpec) -> None:
        self.sizes = list(sizes)
        self._by_name = {s.name.lower(): s for s in self.sizes}
        self.totals = {DEDICATED: quota.dedicated_vcpus, LOW_PRIORITY: quota.low_priority_vcpus}
        self.family_default = quota.family_vcpus
        self.family_limits: dict[tuple[str, str], int] = {}
        for family, limit in quota.families.items():
            self.family_limits[(family.lower(), DEDICATED)] = limit
        for family, limit in quota.low_priority_families.items():
            self.family_limits[(family.lower(), LOW_PRIORITY)] = limit
        self.max_computes = quota.max_computes
        self.family_value = quota.family_value

    # ------------------------------------------------------------------ sizes
    def size(self, name: str | None) -> VmSizeSpec | None:
        """Return a catalogue size by name (case-insensitive), None if unknown.

        Parameters
        ----------
        name
            VM size name.

        Returns
        -------
        VmSizeSpec or None
            The size.
        """
        return self._by_name.get(str(name or "").lower())

    def default_serverless_size(self, count: int, tier: str) -> VmSizeSpec:
        """The size AML picks for a serverless job without ``instance_type``.

        AML picks "a CPU virtual machine ... determined based on quota,
        performance, cost" (*how-to-use-serverless-compute*); the emulator takes
        the first CPU size of the catalogue whose quota can hold the job.

        Parameters
        ----------
        count
            Instance count.
        tier
            Quota tier.

        Returns
        -------
        VmSizeSpec
            The size.
        """
        cpus = [s for s in self.sizes if s.gpus == 0] or self.sizes
        for size in cpus:
            if self.never_fits(Demand(size.family, tier, size.vcpus), count) is None:
                return size
        return cpus[0]

    def families(self) -> list[str]:
        """Return the catalogue's VM families, in catalogue order."""
        return list(dict.fromkeys(s.family for s in self.sizes))

    def demand(self, compute: ComputeState) -> Demand | None:
        """Return what a compute's nodes count against, None when not counted.

        Parameters
        ----------
        compute
            A compute (``AmlCompute``, ``ComputeInstance`` or a serverless pool).

        Returns
        -------
        Demand or None
            None for other kinds and for sizes missing from the catalogue.
        """
        size = self.size(compute.spec.vm_size)
        if size is None or not compute.spec.runs_jobs:
            return None
        return Demand(size.family, tier_of(compute.spec.vm_priority), size.vcpus)

    # ------------------------------------------------------------------ limits
    def limit(self, family: str | None, tier: str) -> int:
        """Return a vCPU limit; -1 means none (per-family low priority by default).

        Parameters
        ----------
        family
            VM family, or None for the regional total of the tier.
        tier
            ``Dedicated`` or ``LowPriority``.

        Returns
        -------
        int
            The limit.
        """
        if family is None:
            return self.totals[tier]
        default = self.family_default if tier == DEDICATED else -1
        return self.family_limits.get((family.lower(), tier), default)

    def set_limit(self, limit: int, family: str | None = None, tier: str = DEDICATED) -> None:
        """Change a vCPU limit.

        Parameters
        ----------
        limit
            New limit (>= 0; -1 removes a per-family low-priority limit).
        family
            VM family, or None for the regional total.
        tier
            ``Dedicated`` or ``LowPriority`` (``Spot`` is accepted for the latter).
        """
        tier = tier_of(tier)
        if limit < -1 or (limit == -1 and (family is None or tier == DEDICATED)):
            raise ValueError("a quota limit must be >= 0")
        if family is None:
            self.totals[tier] = int(limit)
        else:
            self.family_limits[(family.lower(), tier)] = int(limit)

    # ------------------------------------------------------------------- usage
    def usage(self, computes: Iterable[ComputeState]) -> dict[tuple[str | None, str], int]:
        """Return vCPUs in use by family and tier, with the tier totals under family None.

        Parameters
        ----------
        computes
            Every compute of the workspace, serverless pools included.

        Returns
        -------
        dict
            ``(family lower-case or None, tier) -> vCPUs`` of allocated nodes.
        """
        used: dict[tuple[str | None, str], int] = {(None, t): 0 for t in TIERS}
        for compute in computes:
            demand = self.demand(compute)
            if demand is None:
                continue
            vcpus = compute.allocated * demand.vcpus_per_node
            key = (demand.family.lower(), demand.tier)
            used[key] = used.get(key, 0) + vcpus
            used[(None, demand.tier)] += vcpus
        return used

    def shortfall(
        self, computes: Iterable[ComputeState], compute: ComputeState, new_nodes: int
    ) -> str | None:
        """Why ``new_nodes`` more VMs of a compute do not fit the quota now, or None.

        Parameters
        ----------
        computes
            Every compute of the workspace.
        compute
            The compute that would bring the VMs up.
        new_nodes
            VMs it would add (idle ones it reuses are already counted).

        Returns
        -------
        str or None
            The queue message, naming the quota and its numbers.
        """
        demand = self.demand(compute)
        if demand is None or new_nodes <= 0:
            return None
        need = new_nodes * demand.vcpus_per_node
        used = self.usage(computes)
        for family in (demand.family, None):
            limit = self.limit(family, demand.tier)
            current = used.get((family.lower() if family else None, demand.tier), 0)
            if limit >= 0 and current + need > limit:
                return (
                    f"Your job must wait in a queue until quota is available: it needs "
                    f"{need} more vCPUs of '{usage_name(family, demand.tier)}', which has "
                    f"{current} of {limit} in use. It starts when other jobs release "
                    "their nodes."
                )
        return None

    def never_fits(self, demand: Demand, count: int) -> tuple[str, int, int] | None:
        """Whether ``count`` nodes exceed a limit even with nothing else running.

        Parameters
        ----------
        demand
            Family, tier and vCPUs per node.
        count
            Nodes of the job.

        Returns
        -------
        tuple or None
            ``(quota description, limit, nodes that would fit)`` of the first
            limit exceeded (family before total), None when the job can fit.
        """
        need = count * demand.vcpus_per_node
        for family in (demand.family, None):
            limit = self.limit(family, demand.tier)
            if limit >= 0 and need > limit:
                if family is None:
                    what = "total" if demand.tier == DEDICATED else "total low-priority"
                else:
                    what = family_label(family).removesuffix(" Family") + " family"
                    if demand.tier != DEDICATED:
                        what += " low-priority"
                return what, limit, limit // demand.vcpus_per_node
        return None

    def job_quota_error(self, demand: Demand, count: int) -> dict[str, object] | None:
        """AML's error for a job on a cluster whose nodes can never fit the quota.

        The wording is AML's, as reported in MicrosoftLearning/mslearn-dp100#35:
        "Job submission to AzureML Compute encountered an Exception with status
        code JobNodeCountExceedsCoreQuota, The specified subscription has a
        Standard DSv2 family vCPU quota of 2 and is less than the requested job
        node count of 2 which maps to 4 vCPUs. Talk to your Subscription Admin
        or refer to .../how-to-manage-quotas#request-quota-increases to increase
        the Standard DSv2 family vCPU quota".

        Parameters
        ----------
        demand
            The compute's family, tier and vCPUs per node.
        count
            The job's node count.

        Returns
        -------
        dict or None
            ``{"code": "UserError", "message": ..., "innerError": {"code":
            "JobNodeCountExceedsCoreQuota"}}``, None when the job can fit.
        """
        found = self.never_fits(demand, count)
        if found is None:
            return None
        what, limit, _ = found
        message = (
            "Job submission to AzureML Compute encountered an Exception with status code "
            f"JobNodeCountExceedsCoreQuota, The specified subscription has a {what} vCPU "
            f"quota of {limit} and is less than the requested job node count of {count} "
            f"which maps to {count * demand.vcpus_per_node} vCPUs. Talk to your Subscription "
            f"Admin or refer to {QUOTA_DOCS}#request-quota-increases to increase the {what} "
            "vCPU quota"
        )
        return {
            "code": "UserError",
            "message": message,
            "innerError": {"code": "JobNodeCountExceedsCoreQuota"},
        }

    def serverless_quota_error(self, size: VmSizeSpec, tier: str, count: int) -> str | None:
        """The submit-time error of a serverless job that can never fit, None if it can.

        Microsoft Learn (*how-to-use-serverless-compute*, *Quota*): with some quota
        but not enough for the instances, "the error recommends that you decrease
        the number of instances to a valid number based on your quota limit,
        request a quota increase for the VM family, or change the VM size"; with
        no quota for the size, "select a different VM size for which you do have
        quota or request quota for the VM family".  The wording is the emulator's.

        Parameters
        ----------
        size
            The job's ``instance_type``.
        tier
            Quota tier (``Spot`` jobs: low priority).
        count
            ``instance_count``.

        Returns
        -------
        str or None
            The message.
        """
        found = self.never_fits(Demand(size.family, tier, size.vcpus), count)
        if found is None:
            return None
        what, limit, fits = found
        if fits < 1:
            return (
                f"Not enough quota for VM size {size.name}: the subscription has a {what} "
                f"vCPU quota of {limit} and one instance needs {size.vcpus} vCPUs. Select a "
                "different VM size for which you have quota, or request quota for the "
                f"{family_label(size.family)} ({QUOTA_DOCS})."
            )
        return (
            f"Not enough quota for {count} instances of {size.name}: the subscription has a "
            f"{what} vCPU quota of {limit}, and {count} instances need "
            f"{count * size.vcpus} vCPUs. Decrease the instance count to {fits} or fewer, "
            f"request a quota increase for the {family_label(size.family)} ({QUOTA_DOCS}), "
            "or change the VM size."
        )

    def min_nodes_error(self, size: VmSizeSpec, tier: str, min_nodes: int) -> str | None:
        """AML's refusal of a compute whose ``min_nodes`` exceed a vCPU limit, or None.

        Wording as AML answers (code ``ClusterMinNodesExceedCoreQuota``,
        ansible-collections/azure#2209): "The specified subscription has a
        Standard DSv2 family vCPU quota of 6 and cannot accomodate for at least 1
        requested managed compute nodes which maps to 8 vCPUs."

        Parameters
        ----------
        size
            The compute's VM size.
        tier
            Its quota tier.
        min_nodes
            Its ``minNodeCount``.

        Returns
        -------
        str or None
            The message.
        """
        if min_nodes <= 0:
            return None
        found = self.never_fits(Demand(size.family, tier, size.vcpus), min_nodes)
        if found is None:
            return None
        what, limit, _ = found
        return (
            f"The specified subscription has a {what} vCPU quota of {limit} and cannot "
            f"accomodate for at least {min_nodes} requested managed compute nodes which maps "
            f"to {min_nodes * size.vcpus} vCPUs. Talk to your Subscription Admin or refer to "
            f"{QUOTA_DOCS}#request-quota-increases to increase the quota"
        )

    def unknown_size_error(self, name: str, what: str) -> str:
        """The refusal of a VM size missing from the catalogue (emulator wording).

        Parameters
        ----------
        name
            The size asked for.
        what
            What asked for it (``"Compute 'x'"``, ``"Job 'y'"``).

        Returns
        -------
        str
            The message, listing the sizes there are.
        """
        names = ", ".join(s.name for s in self.sizes)
        return (
            f"{what}: VM size '{name}' is not supported in region 'local'. "
            f"The available VM sizes are: {names}"
        )
