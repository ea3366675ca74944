"""``della``: DELLA-Merging, magnitude-ranked drop probabilities, then elect and fuse.

Per task, in every row of the module's tensor (an output unit of the full update, a row of the
KnOTS coefficients or of the Core Space core), entries are ranked by magnitude (rank 0 the
smallest of ``cols``) and kept with probability ``p_j = density - epsilon/2 + epsilon * j /
(cols - 1)``, survivors rescaled by ``1/p_j`` (MagPrune: larger entries are dropped less often,
and the expected update is unchanged); then TIES's sign election (``consensus=total``, the
paper's "elect") and the disjoint mean ("fuse"), times ``lam``. ``epsilon=0`` is DARE with TIES.
Seeded: the keep draws are ``torch.rand`` from one generator (same seed, same bytes).

Reference: Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling", 2024 (arXiv:2406.11617).

Evidence (``bench/quality.py``, six zoo adapters, SmolLM2-135M, all weights 1; mean normalised
score, 0 = base model, 1 = each task's own adapter; ``bench/results/quality.md``):
density 0.5, epsilon 0.1: lam 0.5: 0.35 (lam 1: -0.21 in the exploration run with 20/10
test examples per task), so ``lam=0.5`` is the default.

Example:
    >>> lorakit.merge([a, b], "della", density=0.5, epsilon=0.1, seed=1)   # doctest: +SKIP
"""

from __future__ import annotations

from lorakit.adapter import LoraModule
from lorakit.merge.align import Term
from lorakit.merge.options import DellaOptions, MergeContext
from lorakit.merge.rules import RuleCore, Sparsify
from lorakit.merge.spaces import rule_merge


def della_core(options: DellaOptions) -> RuleCore:
    """DELLA as the shared rule core."""
    return RuleCore(Sparsify.RANK_SAMPLING, options.density, epsilon=options.epsilon,
                    rescale=options.rescale, consensus=options.consensus,
                    disjoint=options.disjoint)


def merge_della(aligned: dict[str, list[Term]], options: DellaOptions, ctx: MergeContext
                ) -> dict[str, LoraModule]:
    """DELLA over every module (see the module docstring)."""
    return rule_merge(aligned, ctx, della_core(options), options.lam, options.space)
