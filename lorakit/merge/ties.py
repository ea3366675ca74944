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

``space``: ``full`` (default, the entries of each full update), ``knots`` or ``core`` (the exact
projections of :mod:`lorakit.merge.spaces`).

Example:
    >>> lorakit.merge([a, b, c], "ties", density=0.2, sign="total")   # doctest: +SKIP
    >>> lorakit.merge([a, b, c], "ties", space="core")                # doctest: +SKIP
"""

from __future__ import annotations

from lorakit.adapter import LoraModule
from lorakit.merge.align import Term
from lorakit.merge.options import Consensus, MergeContext, TiesOptions
from lorakit.merge.rules import RuleCore, Sparsify
from lorakit.merge.spaces import rule_merge


def ties_core(options: TiesOptions) -> RuleCore:
    """TIES as the shared rule core: magnitude trim, sign election, disjoint merge."""
    return RuleCore(Sparsify.MAGNITUDE, options.density,
                    consensus=Consensus(options.sign.value), disjoint=options.disjoint)


def merge_ties(aligned: dict[str, list[Term]], options: TiesOptions, ctx: MergeContext
               ) -> dict[str, LoraModule]:
    """TIES per module in ``options.space`` (see the module docstring)."""
    return rule_merge(aligned, ctx, ties_core(options), options.lam, options.space,
                      options.scope)
