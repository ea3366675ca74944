"""Rank policies shared by every command (resize, merge, extract, squeeze).

For singular values ``s`` (descending) of one module's update:

* ``fixed`` (``--rank N``): rank ``N``.
* ``energy`` (``--energy f``): the minimal ``k`` with ``sum_{i<k} s_i^2 >= f * sum s_i^2``
  (fraction of the squared Frobenius norm kept).
* ``sv_ratio`` (``--sv-ratio X``, kohya): the minimal ``k`` that keeps every ``s_i >= s_max / X``.
* ``sv_fro`` (``--sv-fro f``, kohya): the minimal ``k`` with ``sqrt(sum_{i<k} s_i^2) >= f * ||s||``.
* ``sv_cumulative`` (``--sv-cumulative f``, kohya): the minimal ``k`` with
  ``sum_{i<k} s_i >= f * sum s_i``.
* ``threshold`` (``--threshold T``): keep every ``s_i > T``.
* ``budget`` (``--budget N`` or a fraction in (0, 1]): a total parameter count (or that fraction
  of the current count) allocated across modules, see :func:`allocate_budget`.

Every policy is then clamped to ``[min_rank, max_rank]`` (``min_rank = 1``: an all-zero update
keeps one zero unit, as kohya does) and by the caller to the rank available; ``--conv-rank``
replaces the policy by a fixed rank for conv modules with a spatial kernel.

Where kohya's ``networks/resize_lora.py`` differs (kohya-ss/sd-scripts, ``index_sv_ratio``,
``index_sv_fro``, ``index_sv_cumulative`` and ``rank_resize``):

* ``sv_ratio``: releases up to at least commit 41de936 compute ``index = #{s_i > s_max / X}``
  and keep ``index + 1`` ranks, one more than the target needs (the next, failing singular value
  too). Later releases keep ``index`` ranks: the minimal rank, except that kohya keeps only
  ``s_i > s_max / X`` (strict) where lorakit keeps ``s_i >= s_max / X`` (they differ on ties).
* ``sv_fro`` / ``sv_cumulative``: ``searchsorted`` of the cumulative fractions plus one, the
  minimal rank in exact arithmetic; kohya's float32 cumulative sums can fall short of a target of
  1.0 and then keep the cap. lorakit compares in float64 with a ``1e-12`` tolerance.
* kohya decomposes the dense ``B @ A`` (float32), and in recent releases for matrices with both
  sides above 2048 through ``torch.svd_lowrank`` with ``q = 2 * new_rank``: its ``sv_fro`` and
  ``sv_cumulative`` fractions are then taken over those ``q`` approximate values only, not the
  whole spectrum, so the same target keeps a different rank. lorakit uses the exact spectrum.
* kohya's fixed ``--new_rank`` doubles as the cap of its dynamic methods (``max_rank`` here) and a
  spectrum with ``s_max <= 1e-6`` keeps rank 1.

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
    """Which rule picks the rank; the value is the CLI option's name (``--sv-ratio`` etc.)."""

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

    ``value`` is the rank (FIXED), the fraction (ENERGY, SV_FRO, SV_CUMULATIVE), the ratio
    (SV_RATIO), the threshold (THRESHOLD) or the budget: an ``int`` parameter count, or a
    ``float`` in (0, 1] meaning that fraction of the current parameter count (``1`` is one
    parameter, ``1.0`` is everything). Values are checked on construction (:class:`OptionError`).

    Example:
        >>> RankPolicy.from_options(rank=16, conv_rank=8).for_conv().value
        8
        >>> RankPolicy(PolicyKind.ENERGY, 0.9, max_rank=32).max_rank
        32
    """

    kind: PolicyKind
    value: float
    conv_rank: int | None = None
    min_rank: int = 1
    max_rank: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", PolicyKind(self.kind))
        _check(self.kind, self.value)
        for name in ("conv_rank", "min_rank", "max_rank"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise OptionError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}",
                                  key=name)
        if self.max_rank is not None and self.max_rank < self.min_rank:
            raise OptionError(f"max_rank {self.max_rank} is below min_rank {self.min_rank}",
                              key="max_rank")

    @classmethod
    def fixed(cls, rank: int) -> RankPolicy:
        """``--rank N``.

        Example:
            >>> RankPolicy.fixed(16).rank
            16
        """
        return cls.from_options(rank=rank)

    @classmethod
    def from_options(cls, rank=None, energy=None, sv_ratio=None, sv_fro=None,
                     sv_cumulative=None, threshold=None, budget=None, conv_rank=None, *,
                     min_rank: int = 1, max_rank: int | None = None) -> RankPolicy:
        """The policy from CLI-style options: exactly one of ``rank`` ... ``budget``.

        Raises :class:`OptionError` for none, several or bad values.

        Example:
            >>> RankPolicy.from_options(sv_fro=0.9).kind
            <PolicyKind.SV_FRO: 'sv_fro'>
        """
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
        if kind is PolicyKind.FIXED and isinstance(value, float) and value.is_integer():
            value = int(value)
        return cls(kind, value, conv_rank, min_rank=min_rank, max_rank=max_rank)

    @property
    def is_fixed(self) -> bool:
        return self.kind is PolicyKind.FIXED

    @property
    def is_budget(self) -> bool:
        return self.kind is PolicyKind.BUDGET

    @property
    def rank(self) -> int | None:
        """The fixed rank, or None for the other kinds."""
        return int(self.value) if self.is_fixed else None

    def for_conv(self) -> RankPolicy:
        """The policy for conv modules with a spatial kernel (``--conv-rank`` overrides).

        Example:
            >>> RankPolicy.from_options(energy=0.9).for_conv().kind
            <PolicyKind.ENERGY: 'energy'>
        """
        if self.conv_rank is None:
            return self
        return replace(self, kind=PolicyKind.FIXED, value=self.conv_rank, conv_rank=None)

    def budget_params(self, current_total: int) -> int:
        """The budget in parameters (a float fraction applies to ``current_total``).

        Example:
            >>> RankPolicy.from_options(budget=0.25).budget_params(1000)
            250
        """
        v = self.value
        if isinstance(v, float) and v <= 1.0:
            return int(math.floor(v * current_total))
        return int(v)


def _check(kind: PolicyKind, value) -> None:
    flag = f"--{kind.value.replace('_', '-')}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise OptionError(f"{flag} must be a finite number, got {value!r}", key=kind.value)
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
    elif kind is PolicyKind.BUDGET and not (
            value > 0 and (isinstance(value, int) or value <= 1 or float(value).is_integer())):
        bad = "a parameter count (an integer >= 1) or a fraction in (0, 1]"
    if bad:
        raise OptionError(f"{flag} must be {bad}, got {value}", key=kind.value)


def _minimal(cum: torch.Tensor, target: float) -> int:
    """Smallest k (1-based) with cum[k-1] >= target (cum ascending)."""
    hit = (cum >= target - TOL).nonzero()
    return int(hit[0]) + 1 if hit.numel() else int(cum.numel())


def select_rank(s: torch.Tensor, policy: RankPolicy, *, cost_per_rank: int | None = None) -> int:
    """The rank ``policy`` keeps for one module's singular values ``s (r,)`` (descending).

    A budget needs ``cost_per_rank`` (parameters per kept unit, ``out + in``) and is then
    spent on this module alone: ``floor(N / cost_per_rank)`` units, or ``floor(f * r)`` for a
    fraction ``f``. Across modules use :func:`allocate_budget`.

    Example:
        >>> import torch
        >>> select_rank(torch.tensor([10.0, 1.0, 0.05]), RankPolicy.from_options(sv_ratio=20))
        2
        >>> select_rank(torch.tensor([3.0, 2.0, 1.0]), RankPolicy.from_options(budget=200),
        ...             cost_per_rank=100)
        2
    """
    s = s.double().clamp_min(0)  # (r,)
    n = int(s.numel())
    if n == 0:
        return 0
    kind, v = policy.kind, float(policy.value)
    if kind is PolicyKind.FIXED:
        k = int(v)
    elif kind is PolicyKind.BUDGET:
        if cost_per_rank is None or cost_per_rank < 1:
            raise OptionError("a budget needs the parameters per rank unit (cost_per_rank) for "
                              "one module; across modules use allocate_budget", key="budget")
        k = policy.budget_params(n * int(cost_per_rank)) // int(cost_per_rank)
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
    else:  # THRESHOLD
        k = int((s > v).sum())
    if policy.max_rank is not None:
        k = min(k, policy.max_rank)
    return min(n, max(policy.min_rank, k))


def allocate_budget(spectra: dict[str, torch.Tensor], costs: dict[str, int], budget: int,
                    min_rank: int = 1) -> dict[str, int]:
    """Ranks per module that keep the most ``sum s^2`` (least total squared error) for at most
    ``budget`` parameters, a unit of module ``m`` costing ``costs[m]`` (``out + in``).

    Every module first keeps ``min(min_rank, r)`` units (these count against the budget even when
    they exceed it); then units are taken greedily by gain per parameter ``s_{m,k}^2 / cost_m``
    (each module's gains decrease, so a module's units come in order), skipping a unit that no
    longer fits and going on with cheaper ones, and never a unit with zero gain.

    Optimality: as long as nothing was skipped the chosen set is every unit with gain per
    parameter above some ``lambda``, and no other allocation keeps more for the parameters it
    spends (the Lagrangian argument for this separable problem with constant per-module costs).
    With equal costs that is the exact optimum for the budget; with unequal costs the unspent
    remainder is less than one unit's cost and the result keeps at least the optimum for
    ``budget - max(costs)`` (pinned by brute force in tests/lowrank/test_policy.py).

    Example:
        >>> import torch
        >>> allocate_budget({"a": torch.tensor([3.0, 2.0]), "b": torch.tensor([1.0, 0.5])},
        ...                 {"a": 10, "b": 10}, 30)
        {'a': 2, 'b': 1}
    """
    gains = {k: s.double().clamp_min(0).pow(2) for k, s in spectra.items()}  # (r,) each
    ranks = {k: min(min_rank, int(e.numel())) for k, e in gains.items()}
    left = budget - sum(ranks[k] * costs[k] for k in gains)
    heap: list[tuple[float, int, str]] = []  # (-gain per parameter, insertion order, key)

    def push(key: str) -> None:
        e = gains[key]
        if ranks[key] < e.numel() and float(e[ranks[key]]) > 0:
            heapq.heappush(heap, (-float(e[ranks[key]]) / costs[key], len(heap), key))

    for key in gains:
        push(key)
    while heap and left > 0:
        _, _, key = heapq.heappop(heap)
        if costs[key] > left:
            continue
        ranks[key] += 1
        left -= costs[key]
        push(key)
    return ranks
