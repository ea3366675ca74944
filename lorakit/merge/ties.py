"""``ties``: TIES-Merging on each module's full update.

Per module: ``tau_i = w_i * scale_i * B_i A_i``; trim each task to its top-``density`` entries by
magnitude (per tensor, or with one threshold over all of a task's modules: ``scope=global``); elect
each entry's sign (``total``: sign of the sum; ``frequency``: majority count); average (or sum) the
entries that agree; multiply by ``lam``; return to low rank by randomized SVD and the rank policy.

Reference: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023.

Example:
    >>> lorakit.merge([a, b, c], "ties", density=0.2, sign="total")   # doctest: +SKIP
"""

from __future__ import annotations

import torch

from lorakit.adapter import LoraModule
from lorakit.merge.align import Term
from lorakit.merge.dense import dense_merge, global_thresholds
from lorakit.merge.options import MergeContext, TiesOptions, TrimScope
from lorakit.merge.sparsify import disjoint_merge, elect_sign, trim_magnitude


def merge_ties(aligned: dict[str, list[Term]], options: TiesOptions, ctx: MergeContext
               ) -> dict[str, LoraModule]:
    """TIES per module (see the module docstring)."""
    thresholds = None
    if options.scope is TrimScope.GLOBAL:
        from lorakit.lowrank.device import resolve_device

        n = 1 + max(t.index for terms in aligned.values() for t in terms)
        thresholds = global_thresholds(aligned, n, options.density,
                                       resolve_device(ctx.device), ctx.seed)

    def combine(tau: torch.Tensor, key: str, gen: torch.Generator) -> torch.Tensor:
        if thresholds is None:
            trimmed = trim_magnitude(tau, options.density)
        else:
            th = tau.new_tensor(thresholds).reshape(-1, *([1] * (tau.ndim - 1)))
            trimmed = tau * (tau.abs() >= th).to(tau.dtype)
        return disjoint_merge(trimmed, elect_sign(trimmed, options.sign), options.disjoint)

    return dense_merge(aligned, ctx, combine, options.lam)
