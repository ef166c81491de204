"""VM sizes, vCPU quota and prices: what a cluster will take and cost, before it is submitted.

AML counts quota in vCPUs per subscription and region: dedicated per VM family and in a
regional total, low-priority in one regional total (Microsoft Learn, *Manage and increase
quotas ... Azure Machine Learning*); ``compute.list_usage()`` lists them (azure-rest-api-specs
``machinelearningservices`` ``examples/Usage/list.json``), ``compute.list_sizes()`` each size's
family, vCPUs, GPUs and prices. A job that never fits its quota would sit in ``Queued``
forever. Nothing here talks to AML (``AmlOps`` lists).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

#: ``vmTier`` of ``estimatedVMPrices`` for each way of running nodes.
PRICE_TIER = {"dedicated": "Standard", "low_priority": "LowPriority", "spot": "Spot"}
#: Where AML's quota documentation is (what to read to ask for more).
QUOTA_DOCS = "https://learn.microsoft.com/azure/machine-learning/how-to-manage-quotas"


@dataclass(frozen=True)
class VmSizeInfo:
    """One VM size as AML lists it for the region."""

    name: str
    family: str | None  # the unit of dedicated quota
    vcpus: int
    gpus: int = 0
    low_priority_capable: bool = True
    prices: Mapping[str, float] = field(default_factory=dict)  # hourly, Linux, by vmTier (lower)
    currency: str = "USD"

    def hourly_price(self, tier: str) -> float | None:
        """Estimated price of one node for an hour in ``tier`` (``"dedicated"``, ...), or None."""
        price = self.prices.get(PRICE_TIER.get(tier, tier).lower())
        if price is None and tier == "spot":  # serverless Spot runs on low-priority VMs
            price = self.prices.get("lowpriority")
        return price


def _field(obj: Any, *names: str) -> Any:
    """The first of ``names`` that ``obj`` has set (attribute or mapping key)."""
    for name in names:
        value = obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)
        if value is not None:
            return value
    return None


def size_from_sdk(size: Any) -> VmSizeInfo:
    """A :class:`VmSizeInfo` from azure-ai-ml's ``VmSize`` (``compute.list_sizes()``).

    azure-ai-ml 1.35 leaves the snake_case attributes None and adds the REST names
    (``vCPUs``, ``estimatedVMPrices``) to ``__dict__``: both are read.
    """
    estimated = _field(size, "estimatedVMPrices", "estimated_vm_prices") or {}
    estimated = estimated.as_dict() if hasattr(estimated, "as_dict") else estimated
    prices = {
        str(_field(v, "vmTier", "vm_tier")).lower(): float(_field(v, "retailPrice", "retail_price"))
        for v in _field(estimated, "values") or []
        if str(_field(v, "osType", "os_type") or "Linux").lower() == "linux"
        and _field(v, "retailPrice", "retail_price") is not None
    }
    return VmSizeInfo(
        name=str(size.name),
        family=_field(size, "family"),
        vcpus=int(_field(size, "vCPUs", "v_cp_us") or 0),
        gpus=int(_field(size, "gpus") or 0),
        low_priority_capable=bool(_field(size, "lowPriorityCapable", "low_priority_capable")),
        prices=prices,
        currency=str(_field(estimated, "billingCurrency", "billing_currency") or "USD"),
    )


def find_size(sizes: Iterable[VmSizeInfo], name: str | None) -> VmSizeInfo | None:
    """The size called ``name`` (case-insensitive), or None."""
    return next((s for s in sizes if s.name.lower() == name.lower()), None) if name else None


@dataclass(frozen=True)
class Quota:
    """One quota line: vCPUs in use and the limit (None: no limit AML reports)."""

    name: str
    used: int
    limit: int | None

    @property
    def free(self) -> int | None:
        """VCPUs left, or None without a limit."""
        return None if self.limit is None else max(0, self.limit - self.used)


def _key(text: str) -> str:
    return re.sub(r"[\s_]", "", text).lower()


def quotas_for(usages: Iterable[Any], family: str | None, tier: str) -> list[Quota]:
    """The quota lines (with a limit) that bound ``tier`` nodes of ``family``: family, total.

    ``usages``: ``compute.list_usage()``; Spot uses low-priority quota. A family line is
    recognised by ``name.value``, ``name.localizedValue`` or its ARM id's last segment (AML's
    example spells ``value`` as the label, other providers the family id); none is logged.
    """
    dedicated = tier == "dedicated"
    # standardDSv3Family -> "Standard DSv3 Family Cluster Dedicated vCPUs" (spaces ignored)
    wanted = _key(f"{family}Cluster{'Dedicated' if dedicated else 'LowPriority'}vCPUs")
    total_type = f"/{'dedicated' if dedicated else 'lowpriority'}cores/usages"
    family_lines: list[Quota] = []
    totals: list[Quota] = []
    seen = False  # a line for the family, with or without a limit
    for usage in usages:
        kind = str(getattr(usage, "type", "") or "").lower()
        names, limit = _usage_names(usage), _field(usage, "limit")
        mine = bool(family) and kind.endswith("/vmfamily/usages") and wanted in map(_key, names)
        seen = seen or mine
        if limit is not None and int(limit) >= 0 and (mine or kind.endswith(total_type)):
            used = int(_field(usage, "current_value", "currentValue") or 0)
            (family_lines if mine else totals).append(Quota(names[-1], used, int(limit)))
    if family and not seen:
        logger.warning("quota for family %s (%s) not reported by AML; not checked", family, tier)
    return family_lines[:1] + totals[:1]


def _usage_names(usage: Any) -> list[str]:
    """A usage line's id segment, ``name.value`` and ``name.localizedValue`` (the label last)."""
    name = getattr(usage, "name", None)  # azure-ai-ml 1.35: {"value", "localizedValue"}
    name = {"value": name} if isinstance(name, str) else name
    labels = (_field(name, "value"), _field(name, "localizedValue", "localized_value"))
    names = [
        str(getattr(usage, "id", "") or "").rsplit("/", 1)[-1],
        *map(str, filter(None, labels)),
    ]
    return [n for n in names if n] or [""]


@dataclass(frozen=True)
class QuotaCheck:
    """How a request of ``vcpus`` fits the quota lines that bound it."""

    vcpus: int
    never: Quota | None = None  # the line it exceeds on its own: it can never run
    full: Quota | None = None  # the line too full now: it will wait in Queued


def check_quota(quotas: Iterable[Quota], vcpus: int) -> QuotaCheck:
    """Compare a request of ``vcpus`` with its quota lines (see :func:`quotas_for`)."""
    lines = list(quotas)
    never = next((q for q in lines if q.limit is not None and vcpus > q.limit), None)
    full = next((q for q in lines if q.free is not None and vcpus > q.free), None)
    return QuotaCheck(vcpus, never=never, full=None if never else full)


def describe_price(size: VmSizeInfo | None, tier: str, nodes: int) -> str:
    """``"$0.19/h per node, $0.77/h for 4 nodes (estimate)"``, or ``"price unknown"``."""
    if size is None or (price := size.hourly_price(tier)) is None:
        return "price unknown"
    unit = "$" if size.currency == "USD" else f"{size.currency} "
    return (
        f"{unit}{price:.2f}/h per node, {unit}{price * nodes:.2f}/h for {nodes} node(s) (estimate)"
    )
