"""``dare_linear`` and ``dare_ties``: DARE's random drop-and-rescale on each module's full update.

Per module: ``tau_i = w_i * scale_i * B_i A_i``; each entry is kept with probability ``density``
and survivors are rescaled by ``1 / density`` (seeded: the same seed gives the same bytes).
``dare_linear`` then sums the tasks; ``dare_ties`` elects signs and takes the disjoint mean as
TIES does. The result is multiplied by ``lam`` and returned to low rank by randomized SVD.

Reference: Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous
Models as a Free Lunch" (DARE), ICML 2024.

``space``: ``full`` (default), ``knots`` or ``core`` (:mod:`lorakit.merge.spaces`).

Example:
    >>> lorakit.merge([a, b], "dare_ties", density=0.5, seed=1)   # doctest: +SKIP
"""

from __future__ import annotations

from lorakit.adapter import LoraModule
from lorakit.merge.align import Term
from lorakit.merge.options import Consensus, DareOptions, DareTiesOptions, MergeContext
from lorakit.merge.rules import RuleCore, Sparsify
from lorakit.merge.spaces import rule_merge


def merge_dare_linear(aligned: dict[str, list[Term]], options: DareOptions, ctx: MergeContext
                      ) -> dict[str, LoraModule]:
    """DARE drop/rescale, then the plain sum of tasks."""
    core = RuleCore(Sparsify.RANDOM, options.density, rescale=options.rescale)
    return rule_merge(aligned, ctx, core, options.lam, options.space)


def merge_dare_ties(aligned: dict[str, list[Term]], options: DareTiesOptions,
                    ctx: MergeContext) -> dict[str, LoraModule]:
    """DARE drop/rescale, then TIES sign election and disjoint merge."""
    core = RuleCore(Sparsify.RANDOM, options.density, rescale=options.rescale,
                    consensus=Consensus(options.sign.value), disjoint=options.disjoint)
    return rule_merge(aligned, ctx, core, options.lam, options.space)
