"""``magnitude_prune``: keep each task's top-``density`` entries by magnitude, then sum.

Per module (or, with ``scope=global``, with one threshold over all of a task's modules), then the
weighted sum times ``lam``, returned to low rank by randomized SVD and the rank policy. PEFT calls
this ``magnitude_prune``; it is TIES without sign election.

``space``: ``full`` (default), ``knots`` or ``core`` (:mod:`lorakit.merge.spaces`).

Example:
    >>> lorakit.merge([a, b], "magnitude_prune", density=0.3)   # doctest: +SKIP
"""

from __future__ import annotations

from lorakit.adapter import LoraModule
from lorakit.merge.align import Term
from lorakit.merge.options import MagnitudePruneOptions, MergeContext
from lorakit.merge.rules import RuleCore, Sparsify
from lorakit.merge.spaces import rule_merge


def merge_magnitude_prune(aligned: dict[str, list[Term]], options: MagnitudePruneOptions,
                          ctx: MergeContext) -> dict[str, LoraModule]:
    """Magnitude pruning per task, then the sum."""
    core = RuleCore(Sparsify.MAGNITUDE, options.density)
    return rule_merge(aligned, ctx, core, options.lam, options.space, options.scope)
