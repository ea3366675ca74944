"""``dare_linear`` and ``dare_ties``: DARE's random drop-and-rescale on each module's full update.

Per module: ``tau_i = w_i * scale_i * B_i A_i``; each entry is kept with probability ``density``
and survivors are rescaled by ``1 / density`` (seeded: the same seed gives the same bytes).
``dare_linear`` then sums the tasks; ``dare_ties`` elects signs and takes the disjoint mean as
TIES does. The result is multiplied by ``lam`` and returned to low rank by randomized SVD.

Reference: Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous
Models as a Free Lunch" (DARE), ICML 2024.

Example:
    >>> lorakit.merge([a, b], "dare_ties", density=0.5, seed=1)   # doctest: +SKIP
"""

from __future__ import annotations

import torch

from lorakit.adapter import LoraModule
from lorakit.merge.align import Term
from lorakit.merge.dense import dense_merge
from lorakit.merge.options import DareOptions, DareTiesOptions, MergeContext
from lorakit.merge.sparsify import dare_drop, disjoint_merge, elect_sign


def merge_dare_linear(aligned: dict[str, list[Term]], options: DareOptions, ctx: MergeContext
                      ) -> dict[str, LoraModule]:
    """DARE drop/rescale, then the plain sum of tasks."""

    def combine(tau: torch.Tensor, th, gen: torch.Generator) -> torch.Tensor:
        return dare_drop(tau, options.density, gen, options.rescale).sum(dim=0)

    return dense_merge(aligned, ctx, combine, options.lam)


def merge_dare_ties(aligned: dict[str, list[Term]], options: DareTiesOptions,
                    ctx: MergeContext) -> dict[str, LoraModule]:
    """DARE drop/rescale, then TIES sign election and disjoint merge."""

    def combine(tau: torch.Tensor, th, gen: torch.Generator) -> torch.Tensor:
        dropped = dare_drop(tau, options.density, gen, options.rescale)
        return disjoint_merge(dropped, elect_sign(dropped, options.sign), options.disjoint)

    return dense_merge(aligned, ctx, combine, options.lam)
