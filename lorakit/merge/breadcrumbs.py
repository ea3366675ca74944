"""``breadcrumbs``: Model Breadcrumbs, task arithmetic over sparse masks without outliers.

Per task and module (or over all of a task's modules, ``scope=global``): the ``gamma`` fraction of
entries with the largest magnitudes is dropped as outliers and the next ``density`` fraction is
kept (so ``density`` of the entries survive, from the band just below the outliers); the masked
tasks are summed (``consensus=none``, the paper) or combined by TIES's sign election
(``consensus=total|frequency``, mergekit's ``breadcrumbs_ties``), times ``lam``. The rule is the
shared core of :mod:`lorakit.merge.rules` (``Sparsify.OUTLIERS``) and runs in any ``space``.

Reference: Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
Masks", ECCV 2024.

Evidence (``bench/quality.py``, six zoo adapters, SmolLM2-135M, all weights 1; mean normalised
score, 0 = base model, 1 = each task's own adapter; ``bench/results/quality.md``):
density 0.1, gamma 0.01: lam 1 (the paper's sum) 0.11, lam 0.3: 0.35, so ``lam=0.3`` is the
default.

Example:
    >>> lorakit.merge([a, b, c], "breadcrumbs", density=0.1, gamma=0.01)   # doctest: +SKIP
"""

from __future__ import annotations

from lorakit.adapter import LoraModule
from lorakit.merge.align import Term
from lorakit.merge.options import BreadcrumbsOptions, MergeContext
from lorakit.merge.rules import RuleCore, Sparsify
from lorakit.merge.spaces import rule_merge


def breadcrumbs_core(options: BreadcrumbsOptions) -> RuleCore:
    """Breadcrumbs as the shared rule core."""
    return RuleCore(Sparsify.OUTLIERS, options.density, gamma=options.gamma,
                    consensus=options.consensus, disjoint=options.disjoint)


def merge_breadcrumbs(aligned: dict[str, list[Term]], options: BreadcrumbsOptions,
                      ctx: MergeContext) -> dict[str, LoraModule]:
    """Model Breadcrumbs over every module (see the module docstring)."""
    return rule_merge(aligned, ctx, breadcrumbs_core(options), options.lam, options.space,
                      options.scope)
