"""``magnitude_prune``: keep each task's top-``density`` entries by magnitude, then sum.

Per module (or, with ``scope=global``, with one threshold over all of a task's modules), then the
weighted sum times ``lam``, returned to low rank by randomized SVD and the rank policy. PEFT calls
this ``magnitude_prune``; it is TIES without sign election.

Example:
    >>> lorakit.merge([a, b], "magnitude_prune", density=0.3)   # doctest: +SKIP
"""

from __future__ import annotations

import torch

from lorakit.adapter import LoraModule
from lorakit.merge.align import Term
from lorakit.merge.dense import dense_merge, global_thresholds
from lorakit.merge.options import MagnitudePruneOptions, MergeContext, TrimScope
from lorakit.merge.sparsify import trim_magnitude


def merge_magnitude_prune(aligned: dict[str, list[Term]], options: MagnitudePruneOptions,
                          ctx: MergeContext) -> dict[str, LoraModule]:
    """Magnitude pruning per task, then the sum."""
    thresholds = None
    if options.scope is TrimScope.GLOBAL:
        from lorakit.lowrank.device import resolve_device

        n = 1 + max(t.index for terms in aligned.values() for t in terms)
        thresholds = global_thresholds(aligned, n, options.density,
                                       resolve_device(ctx.device), ctx.seed)

    def combine(tau: torch.Tensor, key: str, gen: torch.Generator) -> torch.Tensor:
        if thresholds is None:
            return trim_magnitude(tau, options.density).sum(dim=0)
        th = tau.new_tensor(thresholds).reshape(-1, *([1] * (tau.ndim - 1)))
        return (tau * (tau.abs() >= th).to(tau.dtype)).sum(dim=0)

    return dense_merge(aligned, ctx, combine, options.lam)
