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
from lorakit.merge.dense import (
    apply_thresholds,
    dense_merge,
    global_thresholds,
    task_thresholds,
)
from lorakit.merge.options import MagnitudePruneOptions, MergeContext, TrimScope


def merge_magnitude_prune(aligned: dict[str, list[Term]], options: MagnitudePruneOptions,
                          ctx: MergeContext) -> dict[str, LoraModule]:
    """Magnitude pruning per task, then the sum."""
    from lorakit.lowrank.device import resolve_device

    device = resolve_device(ctx.device)
    n = 1 + max(t.index for terms in aligned.values() for t in terms)
    if options.scope is TrimScope.GLOBAL:
        shared = global_thresholds(aligned, n, options.density, device, ctx.seed)

        def thresholds(key, terms):
            return shared
    else:
        def thresholds(key, terms):
            return task_thresholds(terms, n, options.density, device)

    def combine(tau: torch.Tensor, th, gen: torch.Generator) -> torch.Tensor:
        return apply_thresholds(tau, th).sum(dim=0)

    return dense_merge(aligned, ctx, combine, options.lam, thresholds)
