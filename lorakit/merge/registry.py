"""The merge methods, each with its name, options type, reference and whether it is exact.

An explicit table (no registration by import side effect): adding a method is one file in
``merge/`` plus one entry here.

Example:
    >>> get_method("cat").exact
    True
    >>> sorted(m for m in METHODS)[:3]
    ['cat', 'factor_linear', 'linear']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lorakit.errors import OptionError
from lorakit.merge import options as o
from lorakit.merge.breadcrumbs import merge_breadcrumbs
from lorakit.merge.cart import merge_cart
from lorakit.merge.cat import merge_cat
from lorakit.merge.dare import merge_dare_linear, merge_dare_ties
from lorakit.merge.della import merge_della
from lorakit.merge.factor_linear import merge_factor_linear
from lorakit.merge.iso_c import merge_iso_c
from lorakit.merge.iso_cts import merge_iso_cts
from lorakit.merge.knots import merge_knots
from lorakit.merge.lego import merge_lego
from lorakit.merge.linear import merge_linear
from lorakit.merge.magnitude_prune import merge_magnitude_prune
from lorakit.merge.regmean import merge_regmean
from lorakit.merge.svd import merge_svd
from lorakit.merge.ties import merge_ties
from lorakit.merge.tsv import merge_tsv


@dataclass(frozen=True)
class MethodSpec:
    """A registered merge method."""

    name: str
    fn: Callable
    options: type
    reference: str
    exact: bool  # the output equals the weighted sum of updates (before any rank policy)
    summary: str
    calibrated: bool = False  # needs a model and calibration prompts (ctx.grams)


METHODS: dict[str, MethodSpec] = {
    "linear": MethodSpec("linear", merge_linear, o.LinearOptions,
                         "Ilharco et al., Task Arithmetic, ICLR 2023", True,
                         "weighted sum of full updates (exact), optional rank policy"),
    "task_arithmetic": MethodSpec("task_arithmetic", merge_linear, o.LinearOptions,
                                  "Ilharco et al., Task Arithmetic, ICLR 2023", True,
                                  "alias of linear; negative weights negate a task"),
    "cat": MethodSpec("cat", merge_cat, o.CatOptions, "PEFT add_weighted_adapter(cat)", True,
                      "exact concatenation, rank = sum of ranks"),
    "svd": MethodSpec("svd", merge_svd, o.SvdOptions, "PEFT add_weighted_adapter(svd)", True,
                      "exact sum truncated by a rank policy (default: largest input rank)"),
    "factor_linear": MethodSpec("factor_linear", merge_factor_linear, o.FactorLinearOptions,
                                "PEFT add_weighted_adapter(linear); LoraHub", False,
                                "A and B averaged separately (inexact: cross terms)"),
    "ties": MethodSpec("ties", merge_ties, o.TiesOptions,
                       "Yadav et al., TIES-Merging, NeurIPS 2023", False,
                       "trim by magnitude, elect sign, disjoint mean (dense, per module)"),
    "dare_linear": MethodSpec("dare_linear", merge_dare_linear, o.DareOptions,
                              "Yu et al., DARE, ICML 2024", False,
                              "random drop and rescale, then sum (dense, seeded)"),
    "dare_ties": MethodSpec("dare_ties", merge_dare_ties, o.DareTiesOptions,
                            "Yu et al., DARE, ICML 2024; Yadav et al., TIES", False,
                            "random drop and rescale, then TIES sign election"),
    "magnitude_prune": MethodSpec("magnitude_prune", merge_magnitude_prune,
                                  o.MagnitudePruneOptions, "PEFT magnitude_prune", False,
                                  "trim by magnitude, then sum (dense, per module)"),
    "lego": MethodSpec("lego", merge_lego, o.LegoOptions,
                       "Zhao et al., LoRA-LEGO, ICLR 2025", False,
                       "k-means over rank-one units; centroids form a rank-k adapter"),
    "knots": MethodSpec("knots", merge_knots, o.KnotsOptions,
                        "Stoica et al., KnOTS, ICLR 2025", False,
                        "joint SVD alignment, then TIES/DARE on aligned coefficients"),
    "breadcrumbs": MethodSpec("breadcrumbs", merge_breadcrumbs, o.BreadcrumbsOptions,
                              "Davari & Belilovsky, Model Breadcrumbs, ECCV 2024", False,
                              "drop each task's outliers and smallest entries, then sum"),
    "della": MethodSpec("della", merge_della, o.DellaOptions,
                        "Deep et al., DELLA-Merging, 2024 (arXiv:2406.11617)", False,
                        "magnitude-ranked drop probabilities, then TIES elect and fuse"),
    "tsv": MethodSpec("tsv", merge_tsv, o.TsvOptions,
                      "Gargiulo et al., Task Singular Vectors (TSV-M), CVPR 2025", False,
                      "per-task top singular vectors, decorrelated (Procrustes), summed"),
    "iso_c": MethodSpec("iso_c", merge_iso_c, o.IsoCOptions,
                        "Marczak et al., No Task Left Behind (Iso-C), ICML 2025", False,
                        "the task sum with its spectrum flattened to the mean"),
    "iso_cts": MethodSpec("iso_cts", merge_iso_cts, o.IsoCtsOptions,
                          "Marczak et al., No Task Left Behind (Iso-CTS), ICML 2025", False,
                          "common + task-specific subspaces, orthogonalised, flattened"),
    "cart": MethodSpec("cart", merge_cart, o.CartOptions,
                       "Choi et al., Revisiting Weight Averaging (CART), 2024", False,
                       "task mean plus low-rank centred residuals"),
    "regmean": MethodSpec("regmean", merge_regmean, o.RegmeanOptions,
                          "Jin et al., RegMean, ICLR 2023", False,
                          "per-layer least squares on calibration activations (model + prompts)",
                          calibrated=True),
}


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise OptionError(f"unknown merge method {name!r} (known: {', '.join(sorted(METHODS))})",
                          key="method") from None
