"""``ties``: TIES-Merging on each module's full update.

Per module: ``tau_i = w_i * scale_i * B_i A_i``; trim each task to its top-``density`` entries by
magnitude (per tensor, or with one threshold over all of a task's modules: ``scope=global``); elect
each entry's sign (``total``: sign of the sum; ``frequency``: majority count); average (or sum) the
entries that agree; multiply by ``lam``; return to low rank by randomized SVD and the rank policy.

Reference: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023.

Default ``density`` 0.1 (the paper uses 0.2), from ``bench/quality.py`` on the six zoo adapters
(SmolLM2-135M, all weights 1; mean normalised score, 0 = base model, 1 = each task's own adapter):
density 0.5: 0.06, 0.2: 0.07, 0.1: 0.17, 0.05: 0.26; with ``lam=0.5`` at 0.1: 0.37. Lower
densities mostly lose less perplexity on the two language-modelling tasks; 0.05 also drops the
date task to 25% (0.1: 32.5%), so 0.1 is the default (``bench/results/quality*.md``).

Example:
    >>> lorakit.merge([a, b, c], "ties", density=0.2, sign="total")   # doctest: +SKIP
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
from lorakit.merge.options import MergeContext, TiesOptions, TrimScope
from lorakit.merge.sparsify import disjoint_merge, elect_sign


def merge_ties(aligned: dict[str, list[Term]], options: TiesOptions, ctx: MergeContext
               ) -> dict[str, LoraModule]:
    """TIES per module (see the module docstring)."""
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
        trimmed = apply_thresholds(tau, th)
        return disjoint_merge(trimmed, elect_sign(trimmed, options.sign), options.disjoint)

    return dense_merge(aligned, ctx, combine, options.lam, thresholds)
