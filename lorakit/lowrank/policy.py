"""Rank policies shared by every command (resize, merge, extract, squeeze).

* ``fixed``: rank ``N`` (capped by the available rank).
* ``energy``: the minimal ``k`` with ``sum_{i<k} s_i^2 >= f * sum s_i^2`` (Frobenius energy).
* ``sv_ratio`` (kohya): the minimal ``k`` keeping every ``s_i >= s_max / X``.
* ``sv_fro`` (kohya): the minimal ``k`` with ``sqrt(sum_{i<k} s_i^2) >= f * ||s||``.
* ``sv_cumulative`` (kohya): the minimal ``k`` with ``sum_{i<k} s_i >= f * sum s_i``.
* ``threshold``: keep ``s_i > T``.
* ``budget``: a total parameter count (or a fraction of the current one) allocated across modules.

kohya's ``resize_lora.py`` computes these targets with ``index_sv_*`` and then keeps
``index + 1`` ranks (``sv_ratio`` counts ``s > s_max/X`` and still adds one), and caps the rank at
``len(S) - 1``. lorakit keeps the minimal rank that meets the target, so on the same input it
usually keeps one rank fewer than kohya, and it may keep the full rank.

The global budget minimises the total squared error ``sum_modules sum_{i >= k_m} s_{m,i}^2``
subject to ``sum_m k_m * (out_m + in_m) <= budget``. Each kept unit of module ``m`` costs
``out_m + in_m`` parameters and removes ``s_{m,k}^2`` error; since singular values are sorted,
a greedy choice of the unit with the highest ``s^2 / cost`` is optimal for this separable problem
up to the last, partially affordable unit (the greedy skips units that no longer fit).

Example:
    >>> import torch
    >>> s = torch.tensor([4.0, 2.0, 1.0, 0.5])
    >>> select_rank(s, RankPolicy.from_options(energy=0.9))
    2
"""

from __future__ import annotations

import enum
import heapq
import math
from dataclasses import dataclass, replace

import torch

from lorakit.errors import OptionError

TOL = 1e-12


class PolicyKind(str, enum.Enum):
    FIXED = "rank"
    ENERGY = "energy"
    SV_RATIO = "sv_ratio"
    SV_FRO = "sv_fro"
    SV_CUMULATIVE = "sv_cumulative"
    THRESHOLD = "threshold"
    BUDGET = "budget"


@dataclass(frozen=True)
class RankPolicy:
    """One rank policy (``kind`` with its ``value``), an optional conv rank and caps.

    Example:
        >>> RankPolicy.from_options(rank=16, conv_rank=8).for_conv().value
        8
    """

    kind: PolicyKind
    value: float
    conv_rank: int | None = None
    min_rank: int = 1
    max_rank: int | None = None

    @classmethod
    def fixed(cls, rank: int) -> RankPolicy:
        return cls.from_options(rank=rank)

    @classmethod
    def from_options(cls, rank=None, energy=None, sv_ratio=None, sv_fro=None,
                     sv_cumulative=None, threshold=None, budget=None, conv_rank=None,
                     max_rank=None) -> RankPolicy:
        """Exactly one of the options; raises OptionError for none, several or bad values."""
        given = {k: v for k, v in (("rank", rank), ("energy", energy), ("sv_ratio", sv_ratio),
                                   ("sv_fro", sv_fro), ("sv_cumulative", sv_cumulative),
                                   ("threshold", threshold), ("budget", budget)) if v is not None}
        if not given:
            if conv_rank is not None:
                raise OptionError("--conv-rank needs a rank policy for the other modules",
                                  key="rank policy")
            raise OptionError("no rank policy given", key="rank policy",
                              hint="pass one of --rank, --energy, --sv-ratio, --sv-fro, "
                                   "--sv-cumulative, --threshold, --budget")
        if len(given) > 1:
            raise OptionError(f"several rank policies given ({', '.join(given)}); pick one",
                              key="rank policy")
        name, value = next(iter(given.items()))
        kind = PolicyKind(name)
        _check(kind, value)
        if conv_rank is not None and int(conv_rank) < 1:
            raise OptionError(f"--conv-rank must be >= 1, got {conv_rank}", key="conv_rank")
        return cls(kind, value, None if conv_rank is None else int(conv_rank),
                   max_rank=max_rank)

    @property
    def is_fixed(self) -> bool:
        return self.kind is PolicyKind.FIXED

    @property
    def is_budget(self) -> bool:
        return self.kind is PolicyKind.BUDGET

    @property
    def rank(self) -> int | None:
        return int(self.value) if self.is_fixed else None

    def for_conv(self) -> RankPolicy:
        """The policy for conv modules (``--conv-rank`` overrides)."""
        if self.conv_rank is None:
            return self
        return replace(self, kind=PolicyKind.FIXED, value=self.conv_rank, conv_rank=None)

    def budget_params(self, current_total: int) -> int:
        """The budget in parameters (a fraction applies to ``current_total``)."""
        v = self.value
        if isinstance(v, float) and v <= 1.0:
            return int(math.floor(v * current_total))
        return int(v)


def _check(kind: PolicyKind, value) -> None:
    bad = None
    if kind is PolicyKind.FIXED and (int(value) != value or value < 1):
        bad = "an integer >= 1"
    elif kind in (PolicyKind.ENERGY, PolicyKind.SV_FRO, PolicyKind.SV_CUMULATIVE) and \
            not 0 < value <= 1:
        bad = "in (0, 1]"
    elif kind is PolicyKind.SV_RATIO and not value >= 1:
        bad = ">= 1"
    elif kind is PolicyKind.THRESHOLD and not value >= 0:
        bad = ">= 0"
    elif kind is PolicyKind.BUDGET and not value > 0:
        bad = "> 0 (a parameter count, or a fraction in (0, 1])"
    if bad:
        raise OptionError(f"--{kind.value.replace('_', '-')} must be {bad}, got {value}",
                          key=kind.value)


def _minimal(cum: torch.Tensor, target: float) -> int:
    """Smallest k (1-based) with cum[k-1] >= target (cum ascending)."""
    hit = (cum >= target - TOL).nonzero()
    return int(hit[0]) + 1 if hit.numel() else int(cum.numel())


def select_rank(s: torch.Tensor, policy: RankPolicy) -> int:
    """The rank a (non-budget) policy keeps for singular values ``s`` (descending).

    Example:
        >>> import torch
        >>> select_rank(torch.tensor([10.0, 1.0, 0.05]), RankPolicy.from_options(sv_ratio=20))
        2
    """
    s = s.double().clamp_min(0)
    n = int(s.numel())
    if n == 0:
        return policy.min_rank
    kind, v = policy.kind, float(policy.value)
    if kind is PolicyKind.FIXED:
        k = int(v)
    elif float(s[0]) <= 0:
        k = 1
    elif kind is PolicyKind.ENERGY:
        e = s * s
        k = _minimal(torch.cumsum(e, 0) / e.sum(), v)
    elif kind is PolicyKind.SV_FRO:
        e = s * s
        k = _minimal(torch.sqrt(torch.cumsum(e, 0) / e.sum()), v)
    elif kind is PolicyKind.SV_CUMULATIVE:
        k = _minimal(torch.cumsum(s, 0) / s.sum(), v)
    elif kind is PolicyKind.SV_RATIO:
        k = int((s >= float(s[0]) / v * (1 - TOL)).sum())
    elif kind is PolicyKind.THRESHOLD:
        k = int((s > v).sum())
    else:
        raise OptionError("a budget is allocated across modules, not per module",
                          key="budget")
    if policy.max_rank is not None:
        k = min(k, policy.max_rank)
    return max(policy.min_rank, min(k, n))


def allocate_budget(spectra: dict[str, torch.Tensor], costs: dict[str, int], budget: int,
                    min_rank: int = 1) -> dict[str, int]:
    """Ranks per module maximising the kept ``sum s^2`` within ``budget`` parameters.

    Every module keeps at least ``min_rank`` units (their cost counts against the budget).

    Example:
        >>> import torch
        >>> allocate_budget({"a": torch.tensor([3.0, 2.0]), "b": torch.tensor([1.0, 0.5])},
        ...                 {"a": 10, "b": 10}, 30)
        {'a': 2, 'b': 1}
    """
    ranks = {k: min(min_rank, int(s.numel())) for k, s in spectra.items()}
    left = budget - sum(ranks[k] * costs[k] for k in spectra)
    heap = []
    for key, s in spectra.items():
        e = s.double().pow(2)
        if ranks[key] < e.numel():
            heapq.heappush(heap, (-float(e[ranks[key]]) / costs[key], key))
    while heap and left > 0:
        _, key = heapq.heappop(heap)
        if costs[key] > left:
            continue
        ranks[key] += 1
        left -= costs[key]
        e = spectra[key]
        if ranks[key] < e.numel():
            heapq.heappush(heap, (-float(e[ranks[key]].double() ** 2) / costs[key], key))
    return ranks
