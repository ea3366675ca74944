"""The one entry-wise rule core behind TIES, DARE, magnitude pruning, Model Breadcrumbs and DELLA.

Every such method is three choices, made here by enums and numbers (mergekit-style), applied to
a stack ``tau (n, rows, cols)`` of task tensors in some space (the full updates, KnOTS
coefficients or Core Space cores, :mod:`lorakit.merge.spaces`):

1. :class:`Sparsify`: which entries of each task survive:
   ``none``; ``magnitude`` (top ``density`` by magnitude: TIES, magnitude pruning); ``random``
   (kept with probability ``density`` and rescaled by ``1/density``: DARE); ``outliers`` (the
   top ``gamma`` fraction by magnitude is dropped as outliers, then the next ``density``
   fraction is kept: Model Breadcrumbs); ``rank_sampling`` (per row, entries ranked by magnitude
   are kept with probabilities rising linearly from ``density - epsilon/2`` to
   ``density + epsilon/2`` and rescaled by ``1/p``: DELLA's MagPrune).
2. :class:`Consensus`: ``none`` sums the surviving entries over tasks; ``total`` /
   ``frequency`` elect each entry's sign (TIES) and combine the agreeing entries with
   :class:`DisjointMerge` (mean or sum).
3. ``lam``: the merged tensor's scale (applied by the caller).

Magnitude cuts (``magnitude``, ``outliers``) are per task, taken over the tensor or over all of a
task's modules, and computed by the caller (:class:`Cuts`), so a space that streams blocks of
rows (the dense route) cuts each task once for the whole module.

Example:
    >>> import torch
    >>> core = RuleCore(Sparsify.MAGNITUDE, 0.5, consensus=Consensus.TOTAL)
    >>> tau = torch.tensor([[[3.0, -1.0]], [[1.0, 2.0]]])
    >>> core.combine(tau, core.cuts(tau), torch.Generator()).tolist()
    [[2.0, 2.0]]
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple

import torch

from lorakit.merge.options import Consensus, DisjointMerge, SignMethod
from lorakit.merge.sparsify import dare_drop, disjoint_merge, elect_sign, kth_largest


class Sparsify(str, enum.Enum):
    """Which entries of each task survive (see the module docstring)."""

    NONE = "none"
    MAGNITUDE = "magnitude"
    RANDOM = "random"
    OUTLIERS = "outliers"
    RANK_SAMPLING = "rank_sampling"


class Cuts(NamedTuple):
    """Per-task magnitude cuts ``(n,)``: keep ``low <= |x|`` and, with ``high``, ``|x| < high``."""

    low: torch.Tensor
    high: torch.Tensor | None = None


def cut_values(mag: torch.Tensor, counts: list[int]) -> list[float]:
    """The ``k``-th largest of the flat magnitudes ``mag`` for each ``k`` in ``counts``
    (``inf`` for ``k <= 0``, 0 for ``k >= numel``).

    Example:
        >>> cut_values(torch.tensor([1.0, 4.0, 2.0, 3.0]), [0, 1, 3, 4])
        [inf, 4.0, 2.0, 0.0]
    """
    out = []
    for k in counts:
        if k <= 0:
            out.append(float("inf"))
        elif k >= mag.numel():
            out.append(0.0)
        else:
            out.append(float(kth_largest(mag, k)))
    return out


@dataclass(frozen=True)
class RuleCore:
    """One entry-wise rule: sparsification, consensus and their parameters."""

    sparsify: Sparsify = Sparsify.NONE
    density: float = 1.0
    gamma: float = 0.0  # outliers: the top fraction dropped
    epsilon: float = 0.0  # rank_sampling: width of the keep-probability ramp
    rescale: bool = True  # random / rank_sampling: survivors times 1/p
    consensus: Consensus = Consensus.NONE
    disjoint: DisjointMerge = DisjointMerge.MEAN

    def counts(self, numel: int) -> tuple[int, int | None]:
        """How many top entries a magnitude cut keeps (``low``) and drops as outliers."""
        if self.sparsify is Sparsify.OUTLIERS:
            top = int(round(self.gamma * numel))
            return top + int(round(self.density * numel)), top
        return int(round(self.density * numel)), None

    @property
    def needs_cuts(self) -> bool:
        return self.sparsify in (Sparsify.MAGNITUDE, Sparsify.OUTLIERS)

    def cuts_from(self, mags: list[torch.Tensor]) -> Cuts:
        """Cuts from each task's flat magnitudes (one tensor per task)."""
        low, high = [], []
        for mag in mags:
            k_low, k_high = self.counts(mag.numel())
            lo, *hi = cut_values(mag, [k_low] + ([k_high] if k_high is not None else []))
            low.append(lo)
            high.append(hi[0] if hi else float("inf"))
        has_high = self.sparsify is Sparsify.OUTLIERS
        return Cuts(torch.tensor(low, dtype=torch.float64),
                    torch.tensor(high, dtype=torch.float64) if has_high else None)

    def cuts(self, tau: torch.Tensor) -> Cuts | None:
        """Per-tensor cuts of a whole stack ``tau (n, ...)`` (None when the rule needs none)."""
        if not self.needs_cuts:
            return None
        return self.cuts_from([t.abs().reshape(-1) for t in tau])

    def sparsified(self, tau: torch.Tensor, cuts: Cuts | None, gen: torch.Generator
                   ) -> torch.Tensor:
        """Each task's surviving entries (a new tensor, or ``tau`` masked in place for the
        magnitude cuts, as the dense route passes a scratch block)."""
        s = self.sparsify
        if s is Sparsify.NONE:
            return tau
        if s is Sparsify.RANDOM:
            return dare_drop(tau, self.density, gen, self.rescale)
        if s is Sparsify.RANK_SAMPLING:
            return rank_sample(tau, self.density, self.epsilon, gen, self.rescale)
        assert cuts is not None
        shape = (-1,) + (1,) * (tau.ndim - 1)
        keep = tau.abs() >= cuts.low.to(device=tau.device, dtype=tau.dtype).reshape(shape)
        if cuts.high is not None:
            high = cuts.high.to(device=tau.device, dtype=tau.dtype).reshape(shape)
            keep &= tau.abs() < high
        return tau.mul_(keep)

    def combine(self, tau: torch.Tensor, cuts: Cuts | None, gen: torch.Generator
                ) -> torch.Tensor:
        """``tau (n, ...)`` -> the merged ``(...)`` (before ``lam``)."""
        kept = self.sparsified(tau, cuts, gen)
        if self.consensus is Consensus.NONE:
            return kept.sum(dim=0)
        sign = elect_sign(kept, SignMethod(self.consensus.value))
        return disjoint_merge(kept, sign, self.disjoint)


def rank_sample(tau: torch.Tensor, density: float, epsilon: float, gen: torch.Generator,
                rescale: bool = True) -> torch.Tensor:
    """DELLA's MagPrune on ``tau (n, rows, cols)``: in each row of each task, the entry of
    magnitude rank ``j`` (0 = smallest of ``cols``) is kept with probability
    ``p_j = density - epsilon/2 + epsilon * j / (cols - 1)`` and rescaled by ``1/p_j``.

    The keep draws are ``torch.rand(tau.shape)`` from ``gen`` (same seed, same bytes).

    Example:
        >>> t = torch.tensor([[[1.0, -3.0, 2.0]]])
        >>> rank_sample(t, 1.0, 0.0, torch.Generator()).tolist()
        [[[1.0, -3.0, 2.0]]]
    """
    cols = tau.shape[-1]
    order = tau.abs().argsort(dim=-1)  # (n, rows, cols) ascending magnitude
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(cols, device=tau.device).expand_as(order))
    step = epsilon / (cols - 1) if cols > 1 else 0.0
    p = (density - epsilon / 2 + step * ranks.to(torch.float64)).clamp(0.0, 1.0)  # (n, rows, cols)
    if cols == 1:
        p = torch.full_like(p, density)
    draw = torch.rand(tau.shape, generator=gen, dtype=torch.float32).to(p.device)
    keep = draw.to(torch.float64) < p
    out = tau * keep.to(tau.dtype)
    if rescale:
        out = out / torch.where(p > 0, p, torch.ones_like(p)).to(tau.dtype)
    return out
